"""One group's event store: the replicated state machine, and on the primary the decisions.

The primary checks a request against the state (tombstone, idempotency, the
expected state) and, with no await in between, issues the command with
``Group.append(..., apply=True)``: the command is applied right there exactly
as replicas will apply it, which assigns versions and positions and queues
the disk writes before the commit point is computed. Two appends to one stream
can therefore never both pass an EXACT check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.slots import slot_for
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_replication_pb2 as epb
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.events import errors
from nodes.events.model import StoredEvent, Stream
from nodes.events.storage import Storage
from nodes.events.store import EventStore
from nodes.replication.journal import JournalLike

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["EVENTS", "AppendResult", "EventsMachine"]

EVENTS = rpb.SERVICE_KIND_EVENTS
CHUNK_BYTES = 1 << 20
"""Snapshot chunks are cut at about this size (one event may exceed it a little)."""
SCAVENGE_BATCH = 10_000
"""Most events one scavenge command removes (later passes take the rest)."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append's events are; ``seq`` is the command to wait for."""

    first_version: int
    last_version: int
    slot: int
    position: int
    duplicate: bool
    seq: int


class EventsMachine:
    """The event store of one group on this node."""

    service = EVENTS
    durable = True

    def __init__(self, group: Group, journal: JournalLike,
                 on_leave: Callable[[int], None] | None = None) -> None:
        self._group = group
        self._on_leave = on_leave
        self.store = EventStore()
        self._storage = Storage(journal, group)
        if group.restored:  # read back from disk at start-up
            self._storage.load(self.store)

    @property
    def group(self) -> Group:
        return self._group

    # -- replication (every copy) -----------------------------------------------

    def apply(self, command: rpb.Command) -> None:
        change = epb.EventsCommand.FromString(command.payload)
        kind = change.WhichOneof("change")
        seq, epoch, store, storage = command.seq, command.epoch, self.store, self._storage
        if kind == "append":
            a = change.append
            stream, log, added = store.append(a.stream, a.events, seq,
                                              command.issued_at.ToNanoseconds())
            if added:
                storage.appended(seq, epoch, stream, log, added)
        elif kind == "set_metadata":
            m = change.set_metadata
            stream = store.set_metadata(m.stream, m.max_count, m.max_age_ns,
                                        m.truncate_before, seq)
            storage.stream_changed(seq, epoch, stream)
        elif kind == "delete":
            storage.stream_changed(seq, epoch, store.soft_delete(change.delete.stream, seq))
        elif kind == "tombstone":
            stream = store.tombstone(change.tombstone.stream, seq)
            storage.removed(seq, epoch, stream, stream.last_version + 1)
            storage.stream_changed(seq, epoch, stream)
        elif kind == "scavenge":
            s = change.scavenge
            found = store.streams.get(s.stream)
            if found is not None and store.remove_before(found, s.before_version):
                storage.removed(seq, epoch, found, s.before_version)

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
            events = [(e.to_record(), e.size + len(e.stream) + len(e.event_id) + 64)
                      for e in (log.entries if log is not None else ()) if not e.removed]
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

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> None:
        slots: list[tuple[int, int]] = []
        streams: list[tuple[int, epb.StreamRecord]] = []
        events: list[StoredEvent] = []
        for slot, data in chunks:
            chunk = epb.EventsSnapshotChunk.FromString(data)
            slots.append((slot, chunk.last_position))
            streams.extend((slot, r) for r in chunk.streams)
            events.extend(StoredEvent.of(r, slot) for r in chunk.events)
        self.store.clear()
        self.store.load(slots, streams, events)
        self._storage.replace(self.store)

    def role_changed(self) -> None:
        if not self._group.writable and self._on_leave is not None:
            self._on_leave(self._group.group_id)

    def close(self) -> None:
        """The group leaves (or is rebuilt): end its subscriptions, forget the state.
        Its rows stay on disk: whether they go is the replication layer's call."""
        if self._on_leave is not None:
            self._on_leave(self._group.group_id)
        self.store.clear()

    # -- decisions (primary) ------------------------------------------------------

    def append(self, stream_id: str, events: Sequence[pb.EventData], expected: int,
               exact_version: int) -> AppendResult:
        stream = self.store.streams.get(stream_id)
        if stream is not None and stream.tombstoned:
            raise errors.stream_deleted(stream_id)
        duplicate = self._duplicate(stream_id, stream, events)
        if duplicate is not None:
            return duplicate
        self._check_expected(stream_id, stream, expected, exact_version)
        command = epb.EventsCommand(append=epb.AppendEvents(stream=stream_id, events=events))
        seq = self._issue(stream_id, command)
        stream = self.store.streams[stream_id]
        last = stream.events[-1]
        return AppendResult(last.version - len(events) + 1, last.version, stream.slot,
                            last.position, False, seq)

    def set_metadata(self, stream_id: str, settings: tuple[int, int, int],
                     expected_version: int | None) -> tuple[int, int]:
        """Replace the settings; ``(metadata_version, seq)``."""
        stream = self.store.streams.get(stream_id)
        if stream is not None and stream.tombstoned:
            raise errors.stream_deleted(stream_id)
        current = stream.metadata_version if stream is not None else 0
        if expected_version is not None and expected_version != current:
            raise errors.metadata_version_mismatch(stream_id, current)
        max_count, max_age_ns, truncate_before = settings
        seq = self._issue(stream_id, epb.EventsCommand(set_metadata=epb.SetMetadata(
            stream=stream_id, max_count=max_count, max_age_ns=max_age_ns,
            truncate_before=truncate_before)))
        return self.store.streams[stream_id].metadata_version, seq

    def delete(self, stream_id: str, expected: int, exact_version: int) -> tuple[int, int]:
        """Soft-delete; ``(last_version, seq)`` (no command if there is nothing to delete)."""
        stream = self.store.streams.get(stream_id)
        if stream is not None and stream.tombstoned:
            raise errors.stream_deleted(stream_id)
        self._check_expected(stream_id, stream, expected, exact_version)
        if stream is None or not stream.exists:
            return (stream.last_version, stream.changed_seq) if stream is not None else (0, 0)
        seq = self._issue(stream_id, epb.EventsCommand(delete=epb.SoftDelete(stream=stream_id)))
        return stream.last_version, seq

    def tombstone(self, stream_id: str, expected: int, exact_version: int) -> tuple[int, int]:
        """Hard-delete; ``(last_version, seq)``."""
        stream = self.store.streams.get(stream_id)
        if stream is not None and stream.tombstoned:
            raise errors.stream_deleted(stream_id)
        self._check_expected(stream_id, stream, expected, exact_version)
        last = stream.last_version if stream is not None else 0
        seq = self._issue(stream_id, epb.EventsCommand(
            tombstone=epb.Tombstone(stream=stream_id)))
        return last, seq

    def scavenge(self, now_ns: int) -> int:
        """Issue commands removing events that retention hides; how many commands."""
        commit = self._group.commit_seq
        issued = 0
        for stream_id in list(self.store.retained):
            stream = self.store.streams.get(stream_id)
            if stream is None or not stream.events:
                continue
            first = stream.events[0].version
            keep = min(first_kept(stream, commit, now_ns), first + SCAVENGE_BATCH)
            if keep > first:
                self._issue(stream_id, epb.EventsCommand(scavenge=epb.Scavenge(
                    stream=stream_id, before_version=keep)))
                issued += 1
        return issued

    def _issue(self, stream_id: str, command: epb.EventsCommand) -> int:
        return self._group.append(slot_for(stream_id), EVENTS, command.SerializeToString(),
                                  apply=True)

    @staticmethod
    def _duplicate(stream_id: str, stream: Stream | None, events: Sequence[pb.EventData]
                   ) -> AppendResult | None:
        """The original result if every event is already there, in order and
        contiguous; None if none is; DUPLICATE_EVENT_ID otherwise."""
        if stream is None or not stream.ids:
            return None
        ids = stream.ids
        found = [ids.get(e.id) for e in events]
        hits = [f for f in found if f is not None]
        if not hits:
            return None
        if len(hits) < len(found):
            raise errors.duplicate_event_id(
                stream_id, f"{len(hits)} of the {len(found)} event ids are already in it")
        first = hits[0].version
        if any(f.version != first + i for i, f in enumerate(hits)):
            raise errors.duplicate_event_id(
                stream_id, "the event ids are already in it, in another order or not "
                "contiguous")
        last = hits[-1]
        return AppendResult(first, last.version, stream.slot, last.position, True,
                            max(f.seq for f in hits))

    @staticmethod
    def _check_expected(stream_id: str, stream: Stream | None, expected: int,
                        exact_version: int) -> None:
        exists = stream is not None and stream.exists
        current = stream.last_version if stream is not None else 0
        if (expected == pb.EXPECTED_STATE_NO_STREAM and exists) \
                or (expected == pb.EXPECTED_STATE_STREAM_EXISTS and not exists) \
                or (expected == pb.EXPECTED_STATE_EXACT and current != exact_version):
            raise errors.version_mismatch(stream_id, current, exists)


def first_kept(stream: Stream, commit_seq: int, now_ns: int) -> int:
    """The lowest committed version retention does not hide (the scavenger keeps
    it and everything above; events hidden out of order by a clock step wait)."""
    last = stream.committed_last(commit_seq)
    version = max(stream.floor(last), stream.events[0].version if stream.events else 1)
    if stream.max_age_ns:
        oldest = now_ns - stream.max_age_ns
        while version <= last:
            event = stream.at(version)
            if event is None or event.created_ns >= oldest:
                break
            version += 1
    return min(version, last + 1)
