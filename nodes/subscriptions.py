"""A node's server-stream subscriptions, by replica group: the registry every
service's Subscribe streams share (events, notify).

A subscription reads committed state itself; the hub only wakes it when a
group it reads commits, and ends it when such a group stops being led here
(or the node stops), so a stream never outlives the primary it reads from.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

from common.errors import MeshStatusError, Reason, ServiceError

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["SHUTDOWN", "Ended", "Subscription", "SubscriptionHub", "too_many_subscriptions"]


def too_many_subscriptions(limit: int) -> ServiceError:
    return ServiceError(
        f"this node already serves {limit} subscriptions (its limit); back off",
        Reason.WATCH_LIMIT, {"limit": str(limit)})


SHUTDOWN = -1
"""`Subscription.ended` when the node is stopping."""
class Ended(Exception):
    """The subscription must end: a group it reads left this node (or the node stops)."""

    def __init__(self, group_id: int) -> None:
        super().__init__(group_id)
        self.group_id = group_id


class Subscription:
    """One Subscribe stream's registration with the hub."""

    __slots__ = ("dirty", "ended", "group_ids", "id", "wake")

    def __init__(self, sub_id: str, group_ids: frozenset[int]) -> None:
        self.id = sub_id
        self.group_ids = group_ids
        self.wake = asyncio.Event()
        self.dirty: set[int] = set()
        """Groups with commits since the subscription last looked."""
        self.ended: int | None = None

    def notify(self, group_id: int) -> None:
        self.dirty.add(group_id)
        self.wake.set()

    def end(self, group_id: int) -> None:
        if self.ended is None:
            self.ended = group_id
        self.wake.set()

    def check(self) -> None:
        if self.ended is not None:
            raise Ended(self.ended)


class SubscriptionHub:
    """Every subscription of the node, by group: woken on commits, ended on loss."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_group: dict[int, set[Subscription]] = {}
        self._count = 0
        self._ids = itertools.count(1)
        self._pending: set[asyncio.Future[None]] = set()
        """Waits for commits whose writer went away before them (`notify_when_committed`)."""

    def __len__(self) -> int:
        return self._count

    def open(self, group_ids: frozenset[int]) -> Subscription:
        if self._count >= self.limit:
            raise too_many_subscriptions(self.limit)
        sub = Subscription(f"sub-{next(self._ids)}", group_ids)
        for group_id in group_ids:
            self._by_group.setdefault(group_id, set()).add(sub)
        self._count += 1
        return sub

    def close(self, sub: Subscription) -> None:
        for group_id in sub.group_ids:
            subs = self._by_group.get(group_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_group[group_id]
        self._count -= 1

    def notify(self, group_id: int) -> None:
        """Entries of ``group_id`` were committed."""
        for sub in self._by_group.get(group_id, ()):
            sub.notify(group_id)

    def end_group(self, group_id: int) -> None:
        """The group is no longer led here."""
        for sub in self._by_group.get(group_id, ()):
            sub.end(group_id)

    def end_all(self) -> None:
        for subs in self._by_group.values():
            for sub in subs:
                sub.end(SHUTDOWN)

    def notify_when_committed(self, group: Group, seq: int) -> None:
        """Wake ``group``'s subscriptions once ``seq`` commits: for a write whose
        call went away before its commit, so nobody else will."""
        try:
            future = group.committing(seq)
        except MeshStatusError:  # the group left: end_group ran
            return
        if future is None:
            self.notify(group.group_id)
            return
        group_id = group.group_id

        def committed(future: asyncio.Future[None]) -> None:
            self._pending.discard(future)
            # Failed: the group left (end_group ran); cancelled: the node stops.
            if not future.cancelled() and future.exception() is None:
                self.notify(group_id)

        # A callback, not a task: this runs for every write batch.
        self._pending.add(future)
        future.add_done_callback(committed)

    async def shutdown(self) -> None:
        """The node stops: end every subscription, stop waiting for commits."""
        self.end_all()
        for future in list(self._pending):
            future.cancel()
