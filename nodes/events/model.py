"""The event store's in-memory shapes: stored events, streams, slot logs.

An event is shared by its stream (version order) and its slot's log (position
order). A stream's stored events always form one contiguous run of versions,
because everything that removes events (retention, soft delete, tombstone)
removes the oldest ones; so an event is still stored if and only if its stream's
first stored version is not above its own (`Stream.holds`). Each event
remembers the seq of the command that wrote it: reads show only events whose
seq is committed, and since seqs grow with positions and versions, what is
uncommitted is always a tail.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from mesh.events.v1 import events_replication_pb2 as epb

__all__ = [
    "CONTENT_TYPE", "CREATED_NS", "DATA", "DELETED", "EVENT_ID", "LIVE", "METADATA",
    "POSITION", "SEQ", "SLOT", "STREAM", "TOMBSTONED", "TYPE", "VERSION", "SlotLog",
    "StoredEvent", "Stream", "event_of", "event_record", "event_size",
]

# The zero value, so a record that sets no state is live (see the proto).
LIVE = epb.STREAM_STATE_UNSPECIFIED
DELETED = epb.STREAM_STATE_DELETED
TOMBSTONED = epb.STREAM_STATE_TOMBSTONED

# Compact a slot log once this many of its entries were removed (and they are
# at least a quarter of it): removal marks entries, compaction drops them.
_COMPACT_AT = 1024


StoredEvent = tuple[str, int, int, int, str, str, bytes, bytes, str, int, int]
"""One event, as every copy of the group keeps it, read with the indexes below.

A plain tuple of strings, bytes and ints, not an object: the garbage collector
stops tracking such a tuple after its first collection, so the events a node
holds cost a full collection nothing. As slotted objects, a million of them
made every full collection walk them all (158 ms, measured in one process)."""
STREAM: Final = 0
VERSION: Final = 1
SLOT: Final = 2
POSITION: Final = 3
EVENT_ID: Final = 4
TYPE: Final = 5
DATA: Final = 6
METADATA: Final = 7
CONTENT_TYPE: Final = 8
CREATED_NS: Final = 9
SEQ: Final = 10
"""The command that wrote it; 0 when read back from disk or a snapshot."""


def event_size(event: StoredEvent) -> int:
    """What a page counts of it: its data and metadata."""
    return len(event[DATA]) + len(event[METADATA])


def event_record(event: StoredEvent) -> epb.StoredEvent:
    """Its form in snapshots."""
    return epb.StoredEvent(
        stream=event[STREAM], version=event[VERSION], position=event[POSITION],
        id=event[EVENT_ID], type=event[TYPE], data=event[DATA], metadata=event[METADATA],
        content_type=event[CONTENT_TYPE], created_ns=event[CREATED_NS])


def event_of(r: epb.StoredEvent, slot: int) -> StoredEvent:
    """An event from its snapshot form."""
    return (r.stream, r.version, slot, r.position, r.id, r.type, r.data, r.metadata,
            r.content_type, r.created_ns, 0)


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
        i = version - events[0][VERSION]
        return events[i] if 0 <= i < len(events) else None

    def holds(self, event: StoredEvent) -> bool:
        """Whether ``event`` (one of this stream's) is still stored."""
        events = self.events
        return bool(events) and events[0][VERSION] <= event[VERSION]

    def committed_last(self, commit_seq: int) -> int:
        """The last version whose append is committed."""
        events = self.events
        i = len(events)
        while i and events[i - 1][SEQ] > commit_seq:
            i -= 1
        return self.last_version if i == len(events) else events[i][VERSION] - 1

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
        while i and entries[i - 1][SEQ] > commit_seq:
            i -= 1
        return i

    def committed_last(self, commit_seq: int) -> int:
        """The slot's last committed position."""
        end = self.committed_end(commit_seq)
        if end == len(self.entries):
            return self.last_position
        return self.entries[end][POSITION] - 1

    def note_removed(self, count: int, stored: Callable[[StoredEvent], bool]) -> None:
        """``count`` of its entries are no longer ``stored``."""
        self.removed += count
        if self.removed >= _COMPACT_AT and self.removed * 4 >= len(self.entries):
            self.entries = [e for e in self.entries if stored(e)]
            self.removed = 0


def _position(event: StoredEvent) -> int:
    return event[POSITION]
