"""One group's event store as a replicated state machine (every copy alike).

Applying a command assigns versions and positions (`EventStore`), returns what
it did to the proposer (`AppendResult` for an append) and the rows that put it
on disk (`Storage`). The primary's checks live in `nodes.events.primary`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.events.v1 import events_replication_pb2 as epb
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.due_schedule import DueSchedule
from nodes.events.model import (
    CREATED_NS,
    EVENT_ID,
    POSITION,
    STREAM,
    VERSION,
    StoredEvent,
    Stream,
    event_of,
    event_record,
    event_size,
)
from nodes.events.storage import Storage
from nodes.events.store import EventStore
from nodes.replication.journal import JournalReader
from nodes.replication.machine import NOTHING, Applied, Persist

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["EVENTS", "AppendResult", "EventsMachine", "first_kept"]

EVENTS = rpb.SERVICE_KIND_EVENTS
CHUNK_BYTES = 1 << 20
"""Snapshot chunks are cut at about this size (one event may exceed it a little)."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append's events are; ``seq`` is the command to wait for."""

    first_version: int
    last_version: int
    slot: int
    position: int
    duplicate: bool
    seq: int


def scavenge_due(stream: Stream) -> int | None:
    """When retention may first hide some of ``stream``'s stored events (and the
    scavenger remove them): 0 when its count or truncation already does, else
    its oldest event's age limit; None when nothing can."""
    events = stream.events
    if not events or not stream.retains:
        return None
    if stream.floor(stream.last_version) > events[0][VERSION]:
        return 0
    if stream.max_age_ns:
        return events[0][CREATED_NS] + stream.max_age_ns
    return None


class ScavengeSchedule(DueSchedule[str]):
    """Streams by when the scavenger may have something to remove from them
    (`scavenge_due`), so a pass costs what is due, not every stream with a
    retention setting (each looked at every pass before)."""

    def __init__(self, streams: Iterable[Stream] = ()) -> None:
        super().__init__()
        for stream in streams:
            self.put(stream)

    def put(self, stream: Stream, not_before: int = 0) -> None:
        """Put ``stream`` in at its due time (``not_before`` at the earliest), if
        it has one."""
        due = scavenge_due(stream)
        if due is not None:
            self.add(stream.stream_id, max(due, not_before))


class EventsMachine:
    """The event store of one group on this node."""

    service = EVENTS
    durable = True
    additive_restore = False

    def __init__(self, group: Group, journal: JournalReader,
                 on_leave: Callable[[int], None] | None = None) -> None:
        self._group = group
        self._on_leave = on_leave
        self.store = EventStore()
        self._storage = Storage(group.group_id)
        self._scavenges: ScavengeSchedule | None = None
        """The primary's, built by its first scavenging pass; a copy that is
        not primary has none."""
        if group.restored:  # read back from disk at start-up
            self._storage.load(journal, self.store)

    @property
    def group(self) -> Group:
        return self._group

    def apply(self, command: rpb.Command) -> Applied:
        change = epb.EventsCommand.FromString(command.payload)
        kind = change.WhichOneof("change")
        seq, store, storage = command.seq, self.store, self._storage
        if kind == "append":
            a = change.append
            stream, log, added = store.append(a.stream, a.events, seq,
                                              command.issued_at.ToNanoseconds())
            if not added:
                return NOTHING
            if self._scavenges is not None:
                self._scavenges.put(stream)  # (in already, mostly: a dict lookup)
            last = added[-1]
            return Applied(
                AppendResult(added[0][VERSION], last[VERSION], stream.slot, last[POSITION],
                             False, seq),
                storage.appended(stream, log, added))
        if kind == "set_metadata":
            m = change.set_metadata
            stream = store.set_metadata(m.stream, m.max_count, m.max_age_ns,
                                        m.truncate_before, seq)
            if self._scavenges is not None:
                self._scavenges.put(stream)
            return Applied(stream.metadata_version, [storage.stream_changed(stream)])
        if kind == "delete":
            stream = store.soft_delete(change.delete.stream, seq)
            if self._scavenges is not None:
                self._scavenges.put(stream)
            return Applied(stream.last_version, [storage.stream_changed(stream)])
        if kind == "tombstone":
            stream = store.tombstone(change.tombstone.stream, seq)
            return Applied(stream.last_version, [
                storage.removed(stream, stream.last_version + 1),
                storage.stream_changed(stream)])
        if kind == "scavenge":
            s = change.scavenge
            found = store.streams.get(s.stream)
            if found is not None and store.remove_before(found, s.before_version):
                return Applied(None, [storage.removed(found, s.before_version)])
        return NOTHING

    def snapshot(self) -> list[tuple[int, bytes]]:
        """Per slot: its last position, its stream records, its events; cut in ~1 MiB."""
        store = self.store
        by_slot: dict[int, list[Stream]] = {}
        for stream in store.streams.values():
            by_slot.setdefault(stream.slot, []).append(stream)
        chunks: list[tuple[int, bytes]] = []
        for slot in sorted(by_slot.keys() | store.slots.keys()):
            log = store.slots.get(slot)
            last = log.last_position if log is not None else 0
            chunk, size, cut = epb.EventsSnapshotChunk(last_position=last), 0, False
            records = [(s.record(), len(s.stream_id) + 64) for s in by_slot.get(slot, ())]
            events = [(event_record(e), event_size(e) + len(e[STREAM]) + len(e[EVENT_ID]) + 64)
                      for e in (log.entries if log is not None else ()) if store.stored(e)]
            for record, cost in records + events:
                if isinstance(record, epb.StreamRecord):
                    chunk.streams.append(record)
                else:
                    chunk.events.append(record)
                size += cost
                if size >= CHUNK_BYTES:
                    chunks.append((slot, chunk.SerializeToString()))
                    chunk, size, cut = epb.EventsSnapshotChunk(last_position=last), 0, True
            if size or not cut:  # a slot with nothing but its last position: one chunk
                chunks.append((slot, chunk.SerializeToString()))
        return chunks

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> list[Persist]:
        slots: list[tuple[int, int]] = []
        streams: list[tuple[int, epb.StreamRecord]] = []
        events: list[StoredEvent] = []
        for slot, data in chunks:
            chunk = epb.EventsSnapshotChunk.FromString(data)
            slots.append((slot, chunk.last_position))
            streams.extend((slot, r) for r in chunk.streams)
            events.extend(event_of(r, slot) for r in chunk.events)
        self._scavenges = None
        self.store.clear()
        self.store.load(slots, streams, events)
        return self._storage.replace(self.store)

    def scavenge_schedule(self) -> ScavengeSchedule:
        """The `ScavengeSchedule` of the streams with retention settings (built on
        first use; a new primary builds it again from its state)."""
        if self._scavenges is None:
            store = self.store
            self._scavenges = ScavengeSchedule(
                store.streams[stream_id] for stream_id in store.retained)
        return self._scavenges

    def role_changed(self) -> None:
        self._scavenges = None
        if not self._group.writable and self._on_leave is not None:
            self._on_leave(self._group.group_id)

    def close(self) -> None:
        """The group leaves (or is rebuilt): end its subscriptions, forget the state.
        Its rows stay on disk: whether they go is the replication layer's call."""
        if self._on_leave is not None:
            self._on_leave(self._group.group_id)
        self._scavenges = None
        self.store.clear()


def first_kept(stream: Stream, commit_seq: int, now_ns: int) -> int:
    """The lowest committed version retention does not hide (the scavenger keeps
    it and everything above; events hidden out of order by a clock step wait)."""
    last = stream.committed_last(commit_seq)
    version = max(stream.floor(last), stream.events[0][VERSION] if stream.events else 1)
    if stream.max_age_ns:
        oldest = now_ns - stream.max_age_ns
        while version <= last:
            event = stream.at(version)
            if event is None or event[CREATED_NS] >= oldest:
                break
            version += 1
    return min(version, last + 1)
