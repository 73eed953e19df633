"""Seconds a caller gives (a ttl, a wait, a delay, a run time) as the Durations and
Timestamps requests carry: one conversion for every service.

What no request can carry is refused here, before anything is sent, the way a
node refuses it: an `InvalidArgumentError` naming the request's field. Without
this a NaN, an infinity or 1e30 seconds came out of protobuf as a bare
``ValueError``/``OverflowError`` ("cannot convert float NaN to integer") that
named nothing the caller wrote. The bounds are the nodes' own (`common.bounds`).
"""

from __future__ import annotations

import math
from datetime import timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from clients.errors import InvalidArgumentError
from common.bounds import (
    DURATION_RANGE,
    MAX_DURATION_SECONDS,
    MAX_TIMESTAMP_SECONDS,
    TIMESTAMP_RANGE,
)

__all__ = ["Seconds", "duration", "seconds", "timestamp"]

Seconds = float | timedelta
"""A number of seconds, or a `timedelta`."""


def duration(value: Seconds, field: str) -> duration_pb2.Duration:
    """``value`` as the Duration of the request field ``field``.

    Negative values go through (the node says what the field allows); beyond
    100 years either way, or not finite, is refused here."""
    if isinstance(value, float | int) and value.__class__ is not bool \
            and 0 <= value <= MAX_DURATION_SECONDS:
        # The common case, on every call's path: no checks left to make (NaN
        # fails the comparison), and the constructor is protobuf's C.
        whole = int(value)
        nanos = round((value - whole) * 1e9)
        if nanos == 1_000_000_000:
            whole, nanos = whole + 1, 0
        return duration_pb2.Duration(seconds=whole, nanos=nanos)
    secs = seconds(value, field)
    if secs > MAX_DURATION_SECONDS:
        raise InvalidArgumentError.of_field(field, DURATION_RANGE)
    if secs < -MAX_DURATION_SECONDS:
        raise InvalidArgumentError.of_field(field, "must not be negative")
    d = duration_pb2.Duration()
    d.FromNanoseconds(_nanoseconds(value, secs))
    return d


def timestamp(value: float, field: str) -> timestamp_pb2.Timestamp:
    """``value`` seconds since the Unix epoch as the Timestamp of ``field``: within
    [1970-01-01, 2200-01-01) UTC, as every node requires."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field}: Unix seconds, not {type(value).__name__}")
    secs = seconds(value, field)
    if not 0 <= secs < MAX_TIMESTAMP_SECONDS:
        raise InvalidArgumentError.of_field(field, TIMESTAMP_RANGE)
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(_nanoseconds(value, secs))
    return ts


def seconds(value: Seconds, field: str) -> float:
    """``value`` in seconds: a finite number, or a timedelta (TypeError for
    anything else; InvalidArgumentError naming ``field`` for NaN and infinities)."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    # bool is an int, but True seconds is a mistake, not a duration.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field}: a number of seconds or a timedelta, "
                        f"not {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidArgumentError.of_field(field, "must be a finite number of seconds")
    return float(value)


def _nanoseconds(value: Seconds, secs: float) -> int:
    if isinstance(value, int):  # exact: no float rounding of whole seconds
        return value * 1_000_000_000
    if isinstance(value, timedelta):
        return (value.days * 86_400 + value.seconds) * 1_000_000_000 \
            + value.microseconds * 1_000
    # Whole seconds apart: secs * 1e9 would round a time like 1.7e9 s to the
    # nearest 256 ns.
    whole = math.floor(secs)
    return whole * 1_000_000_000 + round((secs - whole) * 1e9)
