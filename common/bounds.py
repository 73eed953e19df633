"""Bounds on the times and ids that requests carry, shared by every service.

A ``google.protobuf.Timestamp`` or ``Duration`` from a caller is turned into
nanoseconds (or seconds) only through these helpers, so that no value can
overflow an int64 (sqlite, replication records, ``FromNanoseconds``) or come
back out as a Timestamp beyond year 9999. Each failure is INVALID_ARGUMENT
naming the field, never an exception escaping from protobuf.

The limits:

- a Timestamp lies in [1970-01-01, 2200-01-01) UTC: far enough for any run
  time, and 62 years short of where int64 nanoseconds end (2262-04-11);
- a Duration is not negative and at most 100 years. Services add durations to
  *now* (never to a caller's Timestamp), and now + 100 years is before 2200
  (so a valid Timestamp, in int64 nanoseconds) for any now before 2099;
- nanos lie in [0, 1e9), as the protobuf documentation requires of a
  non-negative value.
"""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from common.errors import invalid_argument

__all__ = ["DURATION_RANGE", "MAX_DURATION_NS", "MAX_DURATION_SECONDS", "MAX_TIMESTAMP_NS",
           "MAX_TIMESTAMP_SECONDS", "NS_PER_SECOND", "TIMESTAMP_RANGE", "check_bytes",
           "duration_ns", "duration_seconds", "timestamp_ns", "too_long"]

NS_PER_SECOND = 1_000_000_000
MAX_TIMESTAMP_SECONDS = 7_258_118_400
"""2200-01-01T00:00:00Z, excluded."""
MAX_TIMESTAMP_NS = MAX_TIMESTAMP_SECONDS * NS_PER_SECOND
MAX_DURATION_SECONDS = 36_525 * 86_400
"""100 years of 365.25 days (36,525 days)."""
MAX_DURATION_NS = MAX_DURATION_SECONDS * NS_PER_SECOND
TIMESTAMP_RANGE = "must lie between 1970-01-01 and 2200-01-01 UTC"
DURATION_RANGE = "must be at most 100 years"
"""What a node (and the typed client, before sending) says of a value past the bounds."""


def timestamp_ns(field: str, ts: timestamp_pb2.Timestamp) -> int:
    """``ts`` in nanoseconds since the epoch, within [1970-01-01, 2200-01-01)."""
    if not 0 <= ts.nanos < NS_PER_SECOND:
        raise invalid_argument(field, "nanos must lie in [0, 1e9)")
    if not 0 <= ts.seconds < MAX_TIMESTAMP_SECONDS:
        raise invalid_argument(field, TIMESTAMP_RANGE)
    return ts.seconds * NS_PER_SECOND + ts.nanos


def duration_ns(field: str, d: duration_pb2.Duration) -> int:
    """``d`` in nanoseconds: not negative, at most 100 years."""
    if d.seconds < 0 or d.nanos < 0:
        raise invalid_argument(field, "must not be negative")
    if d.nanos >= NS_PER_SECOND:
        raise invalid_argument(field, "nanos must lie in [0, 1e9)")
    # Compare in seconds first: d.seconds may be near 2**63, and the product is
    # only computed once it is known to be small.
    if d.seconds > MAX_DURATION_SECONDS:
        raise invalid_argument(field, DURATION_RANGE)
    ns = d.seconds * NS_PER_SECOND + d.nanos
    if ns > MAX_DURATION_NS:
        raise invalid_argument(field, DURATION_RANGE)
    return ns


def duration_seconds(field: str, d: duration_pb2.Duration) -> float:
    """``d`` in seconds (for services that keep float seconds), bounded as
    `duration_ns`."""
    return duration_ns(field, d) / NS_PER_SECOND


def too_long(text: str, limit: int) -> bool:
    """Whether ``text`` is over ``limit`` bytes of UTF-8."""
    # Most ids are short ASCII: skip the encode when even 4 bytes/char would fit.
    return len(text) * 4 > limit and len(text.encode()) > limit


def check_bytes(field: str, text: str, limit: int, *, required: bool = False) -> None:
    """An id-like string: at most ``limit`` bytes of UTF-8 (and not empty if
    ``required``)."""
    if required and not text:
        raise invalid_argument(field, "must not be empty")
    if too_long(text, limit):
        raise invalid_argument(field, f"must be at most {limit} bytes")
