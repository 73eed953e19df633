"""Request validation for the cache: every failure names the offending field."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import duration_pb2

from common.bounds import duration_ns
from common.errors import invalid_argument
from common.tenancy import SEPARATOR

MAX_KEY_BYTES = 1024
MAX_BATCH = 1000
MAX_WATCH_KEYS = 1000


def check_key(key: str, field: str = "key") -> None:
    if not key:
        raise invalid_argument(field, "must not be empty")
    # Most keys are short ASCII: skip the encode when even 4 bytes/char would fit.
    if len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
        raise invalid_argument(field, f"must be at most {MAX_KEY_BYTES} bytes")
    if SEPARATOR in key:
        raise invalid_argument(field, "must not contain the byte 0x1F (it separates tenants)")


def check_value(value: bytes, max_bytes: int, field: str = "value") -> None:
    if len(value) > max_bytes:
        raise invalid_argument(field, f"is {len(value)} bytes; the limit is {max_bytes}")


def ttl_ns(request_has_ttl: bool, ttl: duration_pb2.Duration, field: str = "ttl") -> int:
    """The TTL in nanoseconds, 0 for none; negative, malformed or over-100-year
    durations are rejected (the expire_time must stay a valid Timestamp)."""
    if not request_has_ttl:
        return 0
    return duration_ns(field, ttl)


def check_batch(items: Sequence[object], field: str) -> None:
    if not items:
        raise invalid_argument(field, "must not be empty")
    if len(items) > MAX_BATCH:
        raise invalid_argument(field, f"has {len(items)} items; the limit is {MAX_BATCH}")
