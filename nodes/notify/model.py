"""The notification service's in-memory shapes: entries and the logs that hold them.

A channel's history, a user's inbox and a channel's presence events are each
a `Log`: entries numbered by offset (contiguous: retention only ever removes
the oldest), an epoch naming this incarnation of the numbering, and retention
settings. Each entry remembers the seq of the command that wrote it, so reads
and subscriptions show only what is committed; since seqs grow with offsets,
what is not yet committed is always a tail.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from mesh.notify.v1 import notify_replication_pb2 as npb

__all__ = ["CHANNEL", "CREATED_NS", "DATA", "IDEMPOTENCY_ID", "INBOX", "OFFSET", "PRESENCE",
           "SEQ", "Entry", "Log", "LogKey", "entry_record"]

CHANNEL = npb.LOG_KIND_CHANNEL
INBOX = npb.LOG_KIND_INBOX
PRESENCE = npb.LOG_KIND_PRESENCE

LogKey = tuple[int, str]
"""(kind, tenant-scoped name): where a log is kept in a group's state."""


Entry = tuple[int, bytes, str, int, int]
"""One publication (or inbox notification), as every copy keeps it: its offset,
data, idempotency id, creation time and the seq of the command that wrote it (0
when it came from a snapshot or the disk: committed). Read with the indexes
below. A plain tuple, which the garbage collector does not track: an inbox keeps
up to a thousand entries for a week, and a node may hold millions."""

OFFSET: Final = 0
DATA: Final = 1
IDEMPOTENCY_ID: Final = 2
CREATED_NS: Final = 3
SEQ: Final = 4


def entry_record(entry: Entry) -> npb.EntryRecord:
    offset, data, idempotency_id, created_ns, _ = entry
    return npb.EntryRecord(offset=offset, data=data, idempotency_id=idempotency_id,
                           created_ns=created_ns)


@dataclass(slots=True, eq=False)
class Log:
    """A channel's history or a user's inbox."""

    kind: int
    name: str
    slot: int
    epoch: str
    size: int
    """Most entries kept."""
    ttl_ns: int
    """Longest an entry is kept."""
    last_offset: int = 0
    read_cursor: int = 0
    """Inboxes: everything up to here is read."""
    last_append_ns: int = 0
    entries: deque[Entry] = field(default_factory=deque)
    ids: dict[str, Entry] = field(default_factory=dict)
    """Idempotency id -> entry, for the entries still held."""
    changed_seq: int = 0
    """The last command that changed the read cursor or the settings: reads of
    those wait until it is committed."""

    @property
    def key(self) -> LogKey:
        return self.kind, self.name

    @property
    def earliest(self) -> int:
        """The oldest offset held (last + 1 when none is)."""
        return self.entries[0][OFFSET] if self.entries else self.last_offset + 1

    def committed_last(self, commit_seq: int) -> int:
        """The last offset whose append is committed."""
        entries = self.entries
        i = len(entries)
        while i and entries[i - 1][SEQ] > commit_seq:
            i -= 1
        return self.last_offset if i == len(entries) else entries[i][OFFSET] - 1

    def after(self, offset: int, last: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with offsets in (``offset``, ``last``]."""
        entries = self.entries
        if not entries:
            return []
        first = entries[0][OFFSET]
        start = max(offset + 1 - first, 0)
        end = min(last - first + 1, len(entries), start + limit)
        return [entries[i] for i in range(start, end)] if end > start else []

    def unread(self, commit_seq: int) -> int:
        """Committed entries held after the read cursor."""
        last = self.committed_last(commit_seq)
        return max(0, last - max(self.read_cursor, self.earliest - 1))

    def append(self, data: bytes, idempotency_id: str, created_ns: int, seq: int) -> Entry:
        self.last_offset += 1
        entry = (self.last_offset, data, idempotency_id, created_ns, seq)
        self.entries.append(entry)
        self.last_append_ns = created_ns
        if idempotency_id:
            self.ids[idempotency_id] = entry
        self.keep(self.size)
        return entry

    def keep(self, size: int) -> None:
        """Drop the oldest entries beyond ``size``."""
        while len(self.entries) > size:
            self.drop_oldest()

    def trim_before(self, offset: int) -> int:
        """Drop entries with an offset below ``offset``; how many."""
        dropped = 0
        while self.entries and self.entries[0][OFFSET] < offset:
            self.drop_oldest()
            dropped += 1
        return dropped

    def drop_oldest(self) -> None:
        entry = self.entries.popleft()
        idempotency_id = entry[IDEMPOTENCY_ID]
        if idempotency_id and self.ids.get(idempotency_id) is entry:
            del self.ids[idempotency_id]

    def record(self) -> npb.LogRecord:
        """Its fields, without entries (snapshots add them)."""
        return npb.LogRecord(
            kind=self.kind, name=self.name, epoch=self.epoch,  # type: ignore[arg-type]
            last_offset=self.last_offset, read_cursor=self.read_cursor,
            settings=npb.LogSettings(size=self.size, ttl_ns=self.ttl_ns),
            last_append_ns=self.last_append_ns)
