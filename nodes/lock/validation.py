"""Request validation for locks: every failure names the offending field."""

from __future__ import annotations

from google.protobuf import duration_pb2

from common.bounds import check_bytes, duration_seconds
from common.errors import invalid_argument
from mesh.lock.v1 import lock_pb2 as pb
from nodes.cache.validation import check_batch, check_key
from nodes.config import LockLimits

__all__ = ["check_batch", "check_lease_id", "check_name", "check_owner", "check_request_id",
           "permits", "shared", "ttl", "wait"]

MAX_OWNER_BYTES = 256
MAX_REQUEST_ID_BYTES = 64
MAX_LEASE_ID_BYTES = 64


def check_name(name: str) -> None:
    check_key(name, "name")


def check_owner(owner: str) -> None:
    if len(owner) * 4 > MAX_OWNER_BYTES and len(owner.encode()) > MAX_OWNER_BYTES:
        raise invalid_argument("owner", f"must be at most {MAX_OWNER_BYTES} bytes")


def check_request_id(request_id: str) -> None:
    if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise invalid_argument("request_id", f"must be at most {MAX_REQUEST_ID_BYTES} bytes")


def check_lease_id(lease_id: str) -> None:
    """Lease ids are ours (at most 64 bytes): a longer one cannot name a lease, and
    must not reach the LOCK_NOT_HELD error that quotes it."""
    check_bytes("lease_id", lease_id, MAX_LEASE_ID_BYTES)


def ttl(value: duration_pb2.Duration, limits: LockLimits, *, default: float | None) -> float | None:
    """The ttl in seconds; unset or zero gives ``default``."""
    seconds = duration_seconds("ttl", value)
    if seconds == 0:
        return default
    if not limits.min_ttl <= seconds <= limits.max_ttl:
        raise invalid_argument(
            "ttl", f"must lie within [{limits.min_ttl:g}s, {limits.max_ttl:g}s] (got {seconds:g}s)")
    return seconds


def wait(value: duration_pb2.Duration) -> float:
    """The wait in seconds: not negative, at most 100 years (so that the waiter's
    give-up time is a valid Timestamp)."""
    return duration_seconds("wait_timeout", value)


def permits(wanted: int, max_permits: int) -> tuple[int, int]:
    """``(permits, max_permits)`` with zeros meaning 1."""
    wanted, max_permits = wanted or 1, max_permits or 1
    if wanted > max_permits:
        raise invalid_argument(
            "permits", f"asks for {wanted} permits of a lock that has max_permits {max_permits}")
    return wanted, max_permits


def shared(mode: int, permits: int, max_permits: int) -> bool:
    """Whether a request with ``mode`` (a ``LockMode``) is for a shared (read) lease."""
    if mode not in (pb.LOCK_MODE_UNSPECIFIED, pb.LOCK_MODE_EXCLUSIVE, pb.LOCK_MODE_SHARED):
        raise invalid_argument("mode", f"unknown mode {mode}")
    if mode != pb.LOCK_MODE_SHARED:
        return False
    if max_permits != 1 or permits != 1:
        raise invalid_argument("mode", "SHARED applies to plain locks (max_permits 1)")
    return True
