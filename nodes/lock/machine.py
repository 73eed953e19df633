"""One group's locks as a replicated state machine (every copy alike).

Applying a command changes the `LockTable` and returns the lease it granted,
ended or refreshed. While this copy leads, its `LockPrimary` decides (and
proposes) grants, ends and refreshes and runs the waiters and expiry timers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from common.clock import SYSTEM_CLOCK, Clock
from mesh.lock.v1 import lock_replication_pb2 as lpb
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.config import LockLimits
from nodes.lock.primary import LockPrimary
from nodes.lock.table import LeaseCount, LockTable
from nodes.replication.machine import Applied, Persist

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["LOCK", "LockMachine"]

LOCK = rpb.SERVICE_KIND_LOCK


class LockMachine:
    """The locks of one group on this node."""

    service = LOCK
    durable = False
    additive_restore = False

    def __init__(self, group: Group, limits: LockLimits, count: LeaseCount | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._group = group
        count = count or LeaseCount()
        self.table = LockTable(count)
        self.primary = LockPrimary(group, self.table, limits, count, clock)

    def apply(self, command: rpb.Command) -> Applied:
        return Applied(self.table.apply(lpb.LockCommand.FromString(command.payload)))

    def snapshot(self) -> list[tuple[int, bytes]]:
        return [(0, self.table.to_snapshot().SerializeToString())]

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> list[Persist]:
        for _, data in chunks:
            self.table.load(lpb.LockSnapshot.FromString(data))
        return []

    def role_changed(self) -> None:
        primary = self.primary
        if self._group.writable and not primary.leading:
            primary.lead()
        elif not self._group.writable and primary.leading:
            primary.stop()

    def close(self) -> None:
        self.primary.stop()
        self.table.clear()
