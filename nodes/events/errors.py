"""The event store's errors, as the statuses events.proto documents."""

from __future__ import annotations

import grpc

from common.errors import MeshStatusError, Reason
from common.tenancy import unscoped

__all__ = ["duplicate_event_id", "metadata_version_mismatch", "shutting_down",
           "stream_deleted", "subscription_ended", "too_many_subscriptions",
           "version_mismatch"]


def version_mismatch(stream: str, current_version: int, exists: bool) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.ABORTED,
        f"stream {unscoped(stream)!r} is not in the expected state: its last version is "
        f"{current_version} and it {'exists' if exists else 'does not exist'}",
        Reason.VERSION_MISMATCH,
        {"current_version": str(current_version), "stream_exists": str(exists).lower()})


def metadata_version_mismatch(stream: str, current_version: int) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.ABORTED,
        f"the metadata of stream {unscoped(stream)!r} is at version {current_version}",
        Reason.VERSION_MISMATCH, {"current_version": str(current_version)})


def duplicate_event_id(stream: str, why: str) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"stream {unscoped(stream)!r}: {why}; an identical retry of an earlier append "
        "succeeds, a different one does not", Reason.DUPLICATE_EVENT_ID,
        {"stream": unscoped(stream)})


def stream_deleted(stream: str) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {unscoped(stream)!r} is tombstoned: it can never be read or written again",
        Reason.STREAM_DELETED, {"stream": unscoped(stream)})  # never the tenant prefix


def subscription_ended(group_id: int) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.UNAVAILABLE,
        f"group {group_id} is no longer led by this node; subscribe again (at its new "
        "primary) from your last checkpoint", Reason.GROUP_UNAVAILABLE,
        {"group_id": str(group_id)})


def shutting_down() -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.UNAVAILABLE,
        "the node is shutting down; subscribe again elsewhere from your last checkpoint",
        Reason.SHUTTING_DOWN)


def too_many_subscriptions(limit: int) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"this node already serves {limit} subscriptions (its limit); back off",
        Reason.WATCH_LIMIT, {"limit": str(limit)})
