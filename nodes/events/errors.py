"""The event store's refusals (`ServiceError`), with the reasons events.proto documents."""

from __future__ import annotations

from common.errors import Reason, ServiceError
from common.tenancy import unscoped

__all__ = ["duplicate_event_id", "metadata_version_mismatch", "shutting_down",
           "stream_deleted", "subscription_ended",
           "version_mismatch"]


def version_mismatch(stream: str, current_version: int, exists: bool) -> ServiceError:
    return ServiceError(
        f"stream {unscoped(stream)!r} is not in the expected state: its last version is "
        f"{current_version} and it {'exists' if exists else 'does not exist'}",
        Reason.VERSION_MISMATCH,
        {"current_version": str(current_version), "stream_exists": str(exists).lower()})


def metadata_version_mismatch(stream: str, current_version: int) -> ServiceError:
    return ServiceError(
        f"the metadata of stream {unscoped(stream)!r} is at version {current_version}",
        Reason.VERSION_MISMATCH, {"current_version": str(current_version)})


def duplicate_event_id(stream: str, why: str) -> ServiceError:
    return ServiceError(
        f"stream {unscoped(stream)!r}: {why}; an identical retry of an earlier append "
        "succeeds, a different one does not", Reason.DUPLICATE_EVENT_ID,
        {"stream": unscoped(stream)})


def stream_deleted(stream: str) -> ServiceError:
    return ServiceError(
        f"stream {unscoped(stream)!r} is tombstoned: it can never be read or written again",
        Reason.STREAM_DELETED, {"stream": unscoped(stream)})  # never the tenant prefix


def subscription_ended(group_id: int) -> ServiceError:
    return ServiceError(
        f"group {group_id} is no longer led by this node; subscribe again (at its new "
        "primary) from your last checkpoint", Reason.GROUP_UNAVAILABLE,
        {"group_id": str(group_id)})


def shutting_down() -> ServiceError:
    return ServiceError(
        "the node is shutting down; subscribe again elsewhere from your last checkpoint",
        Reason.SHUTTING_DOWN)

