"""One group's event store state and the changes commands make to it.

Pure and deterministic: each change depends only on the state and its
arguments (the command's seq and issued_at among them), so every copy of a
group that applies the same commands holds the same streams, versions and
positions. Persistence is the machine's business (`nodes.events.storage`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from common.slots import slot_for
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_replication_pb2 as epb
from nodes.events.model import (
    DELETED,
    EVENT_ID,
    LIVE,
    SLOT,
    STREAM,
    TOMBSTONED,
    VERSION,
    SlotLog,
    StoredEvent,
    Stream,
)

__all__ = ["EventStore"]


class EventStore:
    """Streams and slot logs of one group."""

    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.slots: dict[int, SlotLog] = {}
        self.retained: set[str] = set()
        """Streams with retention settings: the candidates for scavenging."""
        self.event_count = 0

    def stream(self, stream_id: str) -> Stream:
        """The stream's record, created empty if new."""
        stream = self.streams.get(stream_id)
        if stream is None:
            stream = self.streams[stream_id] = Stream(stream_id, slot_for(stream_id))
        return stream

    def slot_log(self, slot: int) -> SlotLog:
        log = self.slots.get(slot)
        if log is None:
            log = self.slots[slot] = SlotLog(slot)
        return log

    # -- changes ---------------------------------------------------------------

    def append(self, stream_id: str, events: Sequence[pb.EventData], seq: int,
               created_ns: int) -> tuple[Stream, SlotLog, list[StoredEvent]]:
        """Write ``events`` at the end of the stream (recreating a soft-deleted one)."""
        stream = self.stream(stream_id)
        log = self.slot_log(stream.slot)
        if stream.tombstoned:  # the primary refuses these; never on any copy
            return stream, log, []
        version, position, slot = stream.last_version, log.last_position, stream.slot
        added: list[StoredEvent] = []
        for e in events:
            version += 1
            position += 1
            added.append((stream_id, version, slot, position, e.id, e.type, e.data,
                          e.metadata, e.content_type, created_ns, seq))
        stream.events.extend(added)
        ids = stream.ids
        for event in added:
            ids[event[EVENT_ID]] = event
        log.entries.extend(added)
        stream.last_version, log.last_position = version, position
        if stream.state == DELETED:
            stream.state = LIVE
            stream.changed_seq = seq
        self.event_count += len(added)
        return stream, log, added

    def set_metadata(self, stream_id: str, max_count: int, max_age_ns: int,
                     truncate_before: int, seq: int) -> Stream:
        stream = self.stream(stream_id)
        if stream.tombstoned:
            return stream
        stream.max_count, stream.max_age_ns = max_count, max_age_ns
        stream.truncate_before = truncate_before
        stream.metadata_version += 1
        stream.changed_seq = seq
        self._track(stream)
        return stream

    def soft_delete(self, stream_id: str, seq: int) -> Stream:
        stream = self.stream(stream_id)
        if stream.tombstoned:
            return stream
        stream.truncate_before = stream.last_version + 1
        stream.state = DELETED
        stream.changed_seq = seq
        self._track(stream)
        return stream

    def tombstone(self, stream_id: str, seq: int) -> Stream:
        """Remove every event of the stream and block its id."""
        stream = self.stream(stream_id)
        self.remove_before(stream, stream.last_version + 1)
        stream.state = TOMBSTONED
        stream.changed_seq = seq
        self.retained.discard(stream_id)
        return stream

    def remove_before(self, stream: Stream, before_version: int) -> int:
        """Remove the stream's stored events below ``before_version``; how many."""
        events = stream.events
        if not events or events[0][VERSION] >= before_version:
            return 0
        count = min(before_version - events[0][VERSION], len(events))
        ids = stream.ids
        for event in events[:count]:
            if ids.get(event[EVENT_ID]) is event:
                del ids[event[EVENT_ID]]
        del events[:count]  # and so the slot log's copies are no longer stored
        self.event_count -= count
        log = self.slots.get(stream.slot)
        if log is not None:
            log.note_removed(count, self.stored)
        return count

    def stored(self, event: StoredEvent) -> bool:
        """Whether ``event`` (from a slot log) is still stored in its stream."""
        stream = self.streams.get(event[STREAM])
        return stream is not None and stream.holds(event)

    def _track(self, stream: Stream) -> None:
        if stream.retains:
            self.retained.add(stream.stream_id)
        else:
            self.retained.discard(stream.stream_id)

    # -- whole state (snapshots, disk) ----------------------------------------------

    def load(self, slots: Iterable[tuple[int, int]],
             streams: Iterable[tuple[int, epb.StreamRecord]],
             events: Iterable[StoredEvent]) -> None:
        """Add state read back from a snapshot or the disk: slots as (slot, last
        position), stream records with their slot, events in position order."""
        for slot, last_position in slots:
            if not last_position:  # a slot with stream records only
                continue
            log = self.slot_log(slot)
            log.last_position = max(log.last_position, last_position)
        for slot, r in streams:
            stream = self.streams[r.stream] = Stream(
                r.stream, slot, r.last_version, r.max_count, r.max_age_ns, r.truncate_before,
                r.metadata_version, r.state)
            self._track(stream)
        for event in events:
            stream = self.stream(event[STREAM])
            stream.events.append(event)
            stream.ids[event[EVENT_ID]] = event
            self.slot_log(event[SLOT]).entries.append(event)
            self.event_count += 1

    def clear(self) -> None:
        self.streams.clear()
        self.slots.clear()
        self.retained.clear()
        self.event_count = 0
