"""The notification service's refusals (`ServiceError`), with the reasons notify.proto documents."""

from __future__ import annotations

from common.errors import Reason, ServiceError
from common.tenancy import unscoped
from nodes.notify.model import CHANNEL, INBOX, LogKey

__all__ = ["shutting_down", "subscription_ended", "too_slow"]


def too_slow(key: LogKey, offset: int, epoch: str, why: str) -> ServiceError:
    """The subscription fell behind ``key``'s log; it resumes after ``offset``."""
    kind, name = key
    field = "channel" if kind == CHANNEL else "inbox" if kind == INBOX else "presence"
    return ServiceError(
        f"the subscriber is too slow: {why}; subscribe again with since = offset "
        f"{offset} of epoch {epoch!r} for {field} {unscoped(name)!r}",
        Reason.SUBSCRIBER_TOO_SLOW,
        {field: unscoped(name), "offset": str(offset), "epoch": epoch})


def subscription_ended(group_id: int) -> ServiceError:
    return ServiceError(
        f"group {group_id} is no longer led by this node; subscribe again (at its new "
        "primary) from your last offsets", Reason.GROUP_UNAVAILABLE,
        {"group_id": str(group_id)})


def shutting_down() -> ServiceError:
    return ServiceError(
        "the node is shutting down; subscribe again elsewhere from your last offsets",
        Reason.SHUTTING_DOWN)

