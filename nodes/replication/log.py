"""A group's recent commands, kept to resend to a replica that fell behind.

Every group a node holds keeps one, so together they are bounded: by a
`LogBudget` of bytes shared by all of the node's logs (each may hold its equal
share) and by a count per log. A replica whose position is older than the
log's start, or not in the log's history at all, is rebuilt from a snapshot
instead.

Commands are kept serialized. A protobuf message object costs over a kilobyte
of arena on top of its fields, and a command taken from a received batch keeps
the whole batch's arena alive; kept as bytes, a command costs its size plus a
few dozen bytes, which is what the budget counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from mesh.replication.v1 import replication_pb2 as rpb

__all__ = ["DEFAULT_BUDGET", "DEFAULT_CAPACITY", "CommandLog", "LogBudget"]

DEFAULT_CAPACITY = 10_000
"""Commands per log at most."""
DEFAULT_BUDGET = 64 << 20
"""Bytes for all of a node's logs together."""
ENTRY_OVERHEAD = 120
"""What keeping one command costs beyond its serialized bytes (tuple, bytes
header, ints, the deque's slot), so that many small commands are counted true."""


class LogBudget:
    """Bytes shared by a node's command logs: each holds up to an equal share."""

    __slots__ = ("logs", "total")

    def __init__(self, total: int = DEFAULT_BUDGET) -> None:
        self.total = total
        self.logs = 0

    @property
    def share(self) -> int:
        return self.total // max(self.logs, 1)


class CommandLog:
    """Commands ``base_seq + 1 .. last_seq``, oldest dropped first."""

    __slots__ = ("_budget", "_bytes", "_entries", "_sharing", "base_epoch", "base_seq",
                 "capacity")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, budget: LogBudget | None = None
                 ) -> None:
        self.capacity = capacity
        self._budget = budget if budget is not None else LogBudget()
        self._budget.logs += 1
        self._sharing = True
        self._bytes = 0  # what the entries cost, overhead included
        # (epoch, issued_at in ns, the serialized Command), seq = base_seq + 1 + index.
        self._entries: deque[tuple[int, int, bytes]] = deque()
        # The position just before the first entry (a snapshot's, or (0, 0)).
        self.base_epoch = 0
        self.base_seq = 0

    def release(self) -> None:
        """The group left the node: its share goes back to the others."""
        if self._sharing:
            self._sharing = False
            self._budget.logs -= 1
        self.reset(self.last_epoch, self.last_seq)

    @property
    def last_seq(self) -> int:
        return self.base_seq + len(self._entries)

    @property
    def last_epoch(self) -> int:
        return self._entries[-1][0] if self._entries else self.base_epoch

    @property
    def size(self) -> int:
        """What the log's entries cost in bytes, overhead included."""
        return self._bytes

    def append(self, command: rpb.Command) -> None:
        if command.seq != self.last_seq + 1:
            raise ValueError(f"command seq {command.seq} does not follow {self.last_seq}")
        data = command.SerializeToString()
        entries = self._entries
        issued = command.issued_at  # its fields: ToNanoseconds is Python, and this is hot
        entries.append((command.epoch, issued.seconds * 1_000_000_000 + issued.nanos, data))
        self._bytes += len(data) + ENTRY_OVERHEAD
        limit = self._budget.share
        while len(entries) > 1 and (len(entries) > self.capacity or self._bytes > limit):
            epoch, _, dropped = entries.popleft()
            self._bytes -= len(dropped) + ENTRY_OVERHEAD
            self.base_epoch, self.base_seq = epoch, self.base_seq + 1

    def epoch_at(self, seq: int) -> int | None:
        """The epoch of command ``seq`` if the log still knows it (``base_seq`` too)."""
        if seq == self.base_seq:
            return self.base_epoch
        if self.base_seq < seq <= self.last_seq:
            return self._entries[seq - self.base_seq - 1][0]
        return None

    def follows(self, epoch: int, seq: int) -> bool:
        """Whether position ``(epoch, seq)`` is in this log's history."""
        return self.epoch_at(seq) == epoch

    def issued_at(self, seq: int) -> int | None:
        """When command ``seq`` was issued (ns), if the log holds it."""
        if self.base_seq < seq <= self.last_seq:
            return self._entries[seq - self.base_seq - 1][1]
        return None

    def serialized_since(self, seq: int, limit: int) -> Iterator[bytes]:
        """Up to ``limit`` serialized commands after ``seq`` (which must be >= base_seq)."""
        start = seq - self.base_seq
        if start < 0:
            raise ValueError(f"seq {seq} is before the log's start {self.base_seq}")
        end = min(len(self._entries), start + limit)
        entries = self._entries
        return (entries[i][2] for i in range(start, end))

    def since(self, seq: int, limit: int) -> list[rpb.Command]:
        """Up to ``limit`` commands after ``seq`` (which must be >= base_seq)."""
        return [rpb.Command.FromString(data) for data in self.serialized_since(seq, limit)]

    def reset(self, epoch: int, seq: int) -> None:
        """Forget every entry; the history now starts at ``(epoch, seq)`` (a snapshot)."""
        self._entries.clear()
        self._bytes = 0
        self.base_epoch, self.base_seq = epoch, seq
