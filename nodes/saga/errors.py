"""The saga service's refusals (`ServiceError`), with the reasons saga.proto documents."""

from __future__ import annotations

from common.errors import Reason, ServiceError
from common.tenancy import unscoped

__all__ = ["group_changed", "saga_exists", "saga_finished", "saga_not_found", "type_not_found"]


def saga_not_found(saga_id: str) -> ServiceError:
    return ServiceError(f"no saga {unscoped(saga_id)!r} (unknown, or past its retention)",
                        Reason.SAGA_NOT_FOUND, {"saga_id": unscoped(saga_id)})


def type_not_found(name: str, version: int) -> ServiceError:
    which = f"version {version} of " if version else ""
    return ServiceError(f"no {which}saga type {unscoped(name)!r}; register it first",
                        Reason.SAGA_TYPE_NOT_FOUND,
                        {"type": unscoped(name), "version": str(version)})


def saga_exists(saga_id: str, why: str) -> ServiceError:
    return ServiceError(f"saga {unscoped(saga_id)!r} exists already with {why}",
                        Reason.SAGA_EXISTS, {"saga_id": unscoped(saga_id)})


def saga_finished(saga_id: str, state: str) -> ServiceError:
    return ServiceError(f"saga {unscoped(saga_id)!r} has already ended ({state})",
                        Reason.SAGA_FINISHED, {"saga_id": unscoped(saga_id), "state": state})


def group_changed(group_id: int) -> ServiceError:
    return ServiceError(f"group {group_id} changed primary while the call waited; retry",
                        Reason.GROUP_UNAVAILABLE, {"group_id": str(group_id)})
