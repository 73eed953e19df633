"""A group's recent commands, kept to resend to a replica that fell behind.

Every group a node holds keeps one, so together they are bounded: by a
`LogBudget` of bytes shared by all of the node's logs and by a count per log.
A replica whose position is older than the log's start, or not in the log's
history at all, is rebuilt from a snapshot instead.

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
    """Bytes shared by a node's command logs.

    A log may grow past its equal share while the logs together fit. Once they
    hold more than ``total + slack``, logs past their share give back, down to
    it at most, until they hold ``total - slack``: first the logs not written
    since the last such pass (so when the writes move to other groups, the logs
    that no longer grow make room), then the written ones, the longest cut to
    one length (so busy logs keep even lengths). A pass over the logs per
    ``slack`` bytes appended, at most.
    So a busy group keeps a long log while idle ones hold little, which
    matters more the more groups a node holds: split equally, the default 64 MiB
    left each of a thousand groups 64 KiB, and a replica away for a few seconds
    of one busy group's writes needed a full snapshot.
    """

    __slots__ = ("_logs", "_passed_at", "appends", "limit", "slack", "total", "used")

    def __init__(self, total: int = DEFAULT_BUDGET) -> None:
        self.total = total
        self.slack = total // 16
        self.limit = total + self.slack
        """A pass starts when ``used`` goes past this."""
        self.used = 0
        """What every log's entries cost together, in bytes."""
        self.appends = 0
        """Appends to any log so far: a clock for which logs were written lately."""
        self._passed_at = 0  # ``appends`` at the last pass
        self._logs: set[CommandLog] = set()

    @property
    def logs(self) -> int:
        return len(self._logs)

    @property
    def share(self) -> int:
        return self.total // max(len(self._logs), 1)

    def join(self, log: CommandLog) -> None:
        self._logs.add(log)

    def leave(self, log: CommandLog) -> None:
        self._logs.discard(log)

    def reclaim(self) -> None:
        """``used`` is past ``limit``: logs give bytes back."""
        share = self.share
        since = self._passed_at
        self._passed_at = self.appends
        over = sorted((log for log in self._logs if log.size > share), key=_size, reverse=True)
        idle = [log for log in over if log.last_append <= since]
        goal = self.total - self.slack
        for log in idle:
            if self.used <= goal:
                break
            log.trim(max(share, log.size - (self.used - goal)))
        if self.used > goal:
            _level([log for log in over if log.last_append > since], share,
                   self.used - goal)
        # A log keeps its newest command, however large. If such commands alone
        # hold more than the budget, the next pass waits for ``slack`` more bytes.
        self.limit = max(self.total, self.used) + self.slack


def _size(log: CommandLog) -> int:
    return log.size


def _level(logs: list[CommandLog], floor: int, needed: int) -> None:
    """Free ``needed`` bytes from ``logs`` (largest first) by cutting the largest
    to one length, no shorter than ``floor``: busy logs keep even lengths."""
    held = 0
    for k, log in enumerate(logs, 1):
        held += log.size
        below = max(logs[k].size if k < len(logs) else 0, floor)
        if held - k * below >= needed:
            level = max(floor, (held - needed) // k)
            break
    else:
        k, level = len(logs), floor
    for log in logs[:k]:
        log.trim(level)


class CommandLog:
    """Commands ``base_seq + 1 .. last_seq``, oldest dropped first."""

    __slots__ = ("_budget", "_bytes", "_entries", "base_epoch", "base_seq", "capacity",
                 "last_append")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, budget: LogBudget | None = None
                 ) -> None:
        self.capacity = capacity
        self._budget = budget if budget is not None else LogBudget()
        self._budget.join(self)
        self.last_append = 0  # the budget's append count at this log's last one
        self._bytes = 0  # what the entries cost, overhead included
        # (epoch, issued_at in ns, the serialized Command), seq = base_seq + 1 + index.
        self._entries: deque[tuple[int, int, bytes]] = deque()
        # The position just before the first entry (a snapshot's, or (0, 0)).
        self.base_epoch = 0
        self.base_seq = 0

    def release(self) -> None:
        """The group left the node: what it held goes back to the others."""
        self._budget.leave(self)
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
        cost = len(data) + ENTRY_OVERHEAD
        self._bytes += cost
        budget = self._budget
        budget.used += cost
        budget.appends += 1
        self.last_append = budget.appends
        if len(entries) > self.capacity:
            self._drop()
        if budget.used > budget.limit:
            budget.reclaim()

    def trim(self, limit: int) -> None:
        """Drop the oldest entries until they cost at most ``limit`` bytes (the
        newest always stays)."""
        entries = self._entries
        while len(entries) > 1 and self._bytes > limit:
            self._drop()

    def _drop(self) -> None:
        epoch, _, data = self._entries.popleft()
        cost = len(data) + ENTRY_OVERHEAD
        self._bytes -= cost
        self._budget.used -= cost
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
        self._budget.used -= self._bytes
        self._bytes = 0
        self.base_epoch, self.base_seq = epoch, seq
