"""The event store's in-memory shapes: stored events, streams, slot logs.

An event object is shared by its stream (version order) and its slot's log
(position order). A stream's stored events always form one contiguous run of
versions, because everything that removes events (retention, soft delete,
tombstone) removes the oldest ones. Each event remembers the seq of the command
that wrote it: reads show only events whose seq is committed, and since seqs
grow with positions and versions, what is uncommitted is always a tail.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mesh.events.v1 import events_replication_pb2 as epb

__all__ = ["DELETED", "LIVE", "TOMBSTONED", "SlotLog", "StoredEvent", "Stream"]

# The zero value, so a record that sets no state is live (see the proto).
LIVE = epb.STREAM_STATE_UNSPECIFIED
DELETED = epb.STREAM_STATE_DELETED
TOMBSTONED = epb.STREAM_STATE_TOMBSTONED

# Compact a slot log once this many of its entries were removed (and they are
# at least a quarter of it): removal marks entries, compaction drops them.
_COMPACT_AT = 1024


@dataclass(slots=True, eq=False)
class StoredEvent:
    """One event, as every copy of the group keeps it."""

    stream: str
    version: int
    slot: int
    position: int
    event_id: str
    type: str
    data: bytes
    metadata: bytes
    content_type: str
    created_ns: int
    seq: int = 0
    """The command that wrote it; 0 when read back from disk or a snapshot."""
    removed: bool = False

    @property
    def size(self) -> int:
        return len(self.data) + len(self.metadata)

    def to_record(self) -> epb.StoredEvent:
        return epb.StoredEvent(
            stream=self.stream, version=self.version, position=self.position,
            id=self.event_id, type=self.type, data=self.data, metadata=self.metadata,
            content_type=self.content_type, created_ns=self.created_ns)

    @classmethod
    def of(cls, r: epb.StoredEvent, slot: int) -> StoredEvent:
        return cls(r.stream, r.version, slot, r.position, r.id, r.type, r.data, r.metadata,
                   r.content_type, r.created_ns)


@dataclass(slots=True, eq=False)
class Stream:
    """A stream's record and its stored events (oldest first)."""

    stream_id: str
    slot: int
    last_version: int = 0
    max_count: int = 0
    max_age_ns: int = 0
    truncate_before: int = 0
    metadata_version: int = 0
    state: int = LIVE
    events: list[StoredEvent] = field(default_factory=list)
    ids: dict[str, StoredEvent] = field(default_factory=dict)
    """Event id -> stored event: the idempotency index."""
    changed_seq: int = 0
    """The last command that changed its settings or state (not its events):
    reads wait until it is committed."""

    @property
    def exists(self) -> bool:
        return self.last_version > 0 and self.state == LIVE

    @property
    def tombstoned(self) -> bool:
        return self.state == TOMBSTONED

    @property
    def retains(self) -> bool:
        """Whether retention settings may hide some of its events."""
        return bool(self.max_count or self.max_age_ns or self.truncate_before)

    def at(self, version: int) -> StoredEvent | None:
        events = self.events
        if not events:
            return None
        i = version - events[0].version
        return events[i] if 0 <= i < len(events) else None

    def committed_last(self, commit_seq: int) -> int:
        """The last version whose append is committed."""
        events = self.events
        i = len(events)
        while i and events[i - 1].seq > commit_seq:
            i -= 1
        return self.last_version if i == len(events) else events[i].version - 1

    def floor(self, last: int) -> int:
        """The lowest version visible by count and truncation, given ``last``."""
        floor = max(self.truncate_before, 1)
        if self.max_count:
            floor = max(floor, last - self.max_count + 1)
        return floor

    def record(self) -> epb.StreamRecord:
        return epb.StreamRecord(
            stream=self.stream_id, last_version=self.last_version, max_count=self.max_count,
            max_age_ns=self.max_age_ns, truncate_before=self.truncate_before,
            metadata_version=self.metadata_version, state=self.state)  # type: ignore[arg-type]


class SlotLog:
    """One slot's events in position order (removed ones linger until compaction)."""

    __slots__ = ("entries", "last_position", "removed", "slot")

    def __init__(self, slot: int, last_position: int = 0) -> None:
        self.slot = slot
        self.entries: list[StoredEvent] = []
        self.last_position = last_position
        self.removed = 0

    def index_after(self, position: int) -> int:
        """Index of the first entry with a position above ``position``."""
        return bisect.bisect_right(self.entries, position, key=_position)

    def index_at(self, position: int) -> int:
        """Index of the first entry with a position of at least ``position``."""
        return bisect.bisect_left(self.entries, position, key=_position)

    def committed_end(self, commit_seq: int) -> int:
        """Index just past the last entry whose append is committed."""
        entries = self.entries
        i = len(entries)
        while i and entries[i - 1].seq > commit_seq:
            i -= 1
        return i

    def committed_last(self, commit_seq: int) -> int:
        """The slot's last committed position."""
        end = self.committed_end(commit_seq)
        if end == len(self.entries):
            return self.last_position
        return self.entries[end].position - 1

    def note_removed(self, count: int) -> None:
        self.removed += count
        if self.removed >= _COMPACT_AT and self.removed * 4 >= len(self.entries):
            self.entries = [e for e in self.entries if not e.removed]
            self.removed = 0


def _position(event: StoredEvent) -> int:
    return event.position
