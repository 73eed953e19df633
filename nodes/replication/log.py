"""A group's recent commands, kept to resend to a replica that fell behind.

The log is bounded by count and by bytes (every group of a node keeps one, so
it must stay small): a replica whose position is older than the log's start, or
not in the log's history at all, is rebuilt from a snapshot instead.
"""

from __future__ import annotations

from collections import deque

from mesh.replication.v1 import replication_pb2 as rpb

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_MAX_BYTES", "CommandLog"]

DEFAULT_CAPACITY = 10_000
DEFAULT_MAX_BYTES = 2 << 20


class CommandLog:
    """Commands ``base_seq + 1 .. last_seq``, oldest dropped first."""

    __slots__ = ("_bytes", "_entries", "base_epoch", "base_seq", "capacity", "max_bytes")

    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._bytes = 0  # payload bytes held
        self._entries: deque[rpb.Command] = deque()
        # The position just before the first entry (a snapshot's, or (0, 0)).
        self.base_epoch = 0
        self.base_seq = 0

    @property
    def last_seq(self) -> int:
        return self.base_seq + len(self._entries)

    @property
    def last_epoch(self) -> int:
        return self._entries[-1].epoch if self._entries else self.base_epoch

    def append(self, command: rpb.Command) -> None:
        if command.seq != self.last_seq + 1:
            raise ValueError(f"command seq {command.seq} does not follow {self.last_seq}")
        entries = self._entries
        entries.append(command)
        self._bytes += len(command.payload)
        while len(entries) > 1 and (
                len(entries) > self.capacity or self._bytes > self.max_bytes):
            dropped = entries.popleft()
            self._bytes -= len(dropped.payload)
            self.base_epoch, self.base_seq = dropped.epoch, dropped.seq

    def epoch_at(self, seq: int) -> int | None:
        """The epoch of command ``seq`` if the log still knows it (``base_seq`` too)."""
        if seq == self.base_seq:
            return self.base_epoch
        if self.base_seq < seq <= self.last_seq:
            return self._entries[seq - self.base_seq - 1].epoch
        return None

    def follows(self, epoch: int, seq: int) -> bool:
        """Whether position ``(epoch, seq)`` is in this log's history."""
        return self.epoch_at(seq) == epoch

    def since(self, seq: int, limit: int) -> list[rpb.Command]:
        """Up to ``limit`` commands after ``seq`` (which must be >= base_seq)."""
        start = seq - self.base_seq
        if start < 0:
            raise ValueError(f"seq {seq} is before the log's start {self.base_seq}")
        end = min(len(self._entries), start + limit)
        return [self._entries[i] for i in range(start, end)]

    def reset(self, epoch: int, seq: int) -> None:
        """Forget every entry; the history now starts at ``(epoch, seq)`` (a snapshot)."""
        self._entries.clear()
        self._bytes = 0
        self.base_epoch, self.base_seq = epoch, seq
