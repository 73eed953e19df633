"""The lock service's refusals (`ServiceError`), with the reasons lock.proto documents."""

from __future__ import annotations

from common.errors import Reason, ServiceError
from common.tenancy import unscoped

__all__ = ["lock_timeout", "not_held", "permits_mismatch", "primary_lost", "superseded",
           "too_many_leases", "too_many_waiters"]


def lock_timeout(name: str, fencing_token: int, waiters: int) -> ServiceError:
    return ServiceError(
        f"lock {unscoped(name)!r} was not acquired in time; nothing is held and nothing is queued",
        Reason.LOCK_TIMEOUT,
        {"fencing_token": str(fencing_token), "waiters": str(waiters)})


def not_held(name: str, lease_id: str) -> ServiceError:
    return ServiceError(
        f"lease {lease_id!r} of lock {unscoped(name)!r} is unknown, released or expired; "
        "acquire again",
        Reason.LOCK_NOT_HELD, {"name": unscoped(name), "lease_id": lease_id})


def permits_mismatch(name: str, max_permits: int) -> ServiceError:
    return ServiceError(
        f"lock {unscoped(name)!r} is in use with max_permits {max_permits}",
        Reason.PERMITS_MISMATCH, {"max_permits": str(max_permits)})


def too_many_waiters(name: str, limit: int) -> ServiceError:
    return ServiceError(
        f"lock {unscoped(name)!r} already has {limit} waiters (the node's limit); back off",
        Reason.TOO_MANY_WAITERS, {"limit": str(limit)})


def primary_lost(group_id: int) -> ServiceError:
    return ServiceError(
        f"group {group_id} is no longer led by this node; waiters are not carried over, "
        "so acquire again at its new primary",
        Reason.GROUP_UNAVAILABLE, {"group_id": str(group_id)})


def superseded() -> ServiceError:
    return ServiceError(
        "a retry of this Acquire (same request_id) took its place in the queue",
        Reason.SUPERSEDED)


def too_many_leases(limit: int) -> ServiceError:
    return ServiceError(
        f"this node already keeps {limit} leases (its limit); back off",
        Reason.TOO_MANY_LEASES, {"limit": str(limit)})
