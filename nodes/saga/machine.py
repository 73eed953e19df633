"""One group's sagas and saga types as a replicated state machine (every copy alike).

Applying a command records a decision of the primary (a new type version, a
saga started, a job enqueued or ended, a cancel, history published, sagas
forgotten) and moves the saga on by the rules of `nodes.saga.progress`, from
the record and the command alone. The state is held in memory on every copy
and mirrored into the node's journal (`Storage`), like the scheduler's, so
sagas survive failovers and restarts of every node.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from common.slots import slot_for
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.saga.v1 import saga_pb2 as pb
from mesh.saga.v1 import saga_replication_pb2 as spb
from nodes.replication.journal import JournalReader
from nodes.replication.machine import NOTHING, Applied, Persist
from nodes.saga import progress
from nodes.saga.storage import Storage

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["SAGA", "SagaMachine"]

SAGA = rpb.SERVICE_KIND_SAGA


class SagaMachine:
    """The sagas and saga types of one group on this node."""

    service = SAGA
    durable = True
    additive_restore = False

    def __init__(self, group: Group, journal: JournalReader,
                 on_change: Callable[[Group, str], None] | None = None,
                 on_leave: Callable[[Group], None] | None = None) -> None:
        self._group = group
        self._storage = Storage(group.group_id)
        self._on_change = on_change
        self._on_leave = on_leave
        self.sagas: dict[str, spb.SagaRecord] = {}
        """By (tenant-scoped) saga id."""
        self.active: set[str] = set()
        """Ids of the sagas not in a final state: what the primary's driver walks."""
        self.unpublished: set[str] = set()
        """Ids of the sagas whose history is not all in the event store yet."""
        self.types: dict[str, spb.TypeRecord] = {}
        self.changed: dict[str, int] = {}
        """Saga id or type name -> seq of the command that last changed it (reads
        wait until it is committed)."""
        self._ended: list[tuple[int, str]] = []
        """The ended sagas as (end time, id), a heap kept on every copy: the
        primary's retention sweep takes only what expired from it, where walking
        every saga of the group blocked the loop in proportion to all the sagas
        retained (some 25 ms per 20,000, once a minute)."""
        if group.restored:  # read back from disk at start-up
            sagas, types = self._storage.load(journal)
            for record in sagas:
                self._keep(record)
            self.types = {t.name: t for t in types}

    @property
    def group(self) -> Group:
        return self._group

    def _keep(self, record: spb.SagaRecord) -> None:
        saga_id = record.saga.saga_id
        self.sagas[saga_id] = record
        if record.saga.state in progress.FINAL:
            self.active.discard(saga_id)
            if record.saga.HasField("end_time"):
                heapq.heappush(self._ended, (record.saga.end_time.ToNanoseconds(), saga_id))
        else:
            self.active.add(saga_id)
        if record.published < len(record.saga.history):
            self.unpublished.add(saga_id)
        else:
            self.unpublished.discard(saga_id)

    def apply(self, command: rpb.Command) -> Applied:
        change = spb.SagaCommand.FromString(command.payload)
        kind = change.WhichOneof("change")
        now = command.issued_at.ToNanoseconds()
        if kind == "registered":
            definition = change.registered.definition
            versions = self.types.get(definition.name)
            if versions is None:
                versions = self.types[definition.name] = spb.TypeRecord(name=definition.name)
            versions.versions.append(definition)
            self.changed[definition.name] = command.seq
            return Applied(len(versions.versions), [self._storage.type(versions)])
        if kind == "started":
            record = spb.SagaRecord()
            record.CopyFrom(change.started.record)
            saga_id = record.saga.saga_id
            if saga_id in self.sagas:  # the primary checked; a replay changes nothing
                return Applied(self.sagas[saga_id])
            progress.begin(record, now)
            return self._changed(record, command.seq)
        if kind == "dispatched":
            d = change.dispatched
            found = self.sagas.get(d.saga_id)
            if found is None or not progress.dispatched(found, d.step, d.phase, d.job_id, now):
                return NOTHING
            return self._changed(found, command.seq)
        if kind == "ended":
            found = self.sagas.get(change.ended.saga_id)
            if found is None or not progress.ended(found, change.ended, now):
                return NOTHING
            return self._changed(found, command.seq)
        if kind == "cancel":
            found = self.sagas.get(change.cancel.saga_id)
            if found is None or not progress.cancel(found, change.cancel.reason, now):
                return NOTHING
            return self._changed(found, command.seq)
        if kind == "published":
            p = change.published
            found = self.sagas.get(p.saga_id)
            if found is None or p.up_to <= found.published:
                return NOTHING
            found.published = min(p.up_to, len(found.saga.history))
            if found.published >= len(found.saga.history):
                self.unpublished.discard(p.saga_id)
            # Not a change anyone waits for: no on_change, no changed seq.
            return Applied(None, [self._storage.saga(found)])
        if kind == "forgotten":
            gone = [saga_id for saga_id in change.forgotten.saga_ids
                    if self.sagas.pop(saga_id, None) is not None]
            for saga_id in gone:
                self.active.discard(saga_id)
                self.unpublished.discard(saga_id)
                self.changed.pop(saga_id, None)
            # A copy that never sweeps drops the entries of what was forgotten,
            # the oldest: they are on top.
            heap = self._ended
            while heap and not self._ended_at(*heap[0]):
                heapq.heappop(heap)
            return Applied(len(gone), [self._storage.forgotten(gone)] if gone else [])
        return NOTHING

    def _changed(self, record: spb.SagaRecord, seq: int) -> Applied:
        self._keep(record)
        saga_id = record.saga.saga_id
        self.changed[saga_id] = seq
        if self._on_change is not None:
            self._on_change(self._group, saga_id)
        return Applied(record, [self._storage.saga(record)])

    def ended_before(self, cutoff_ns: int, limit: int) -> list[str]:
        """Up to ``limit`` ids of sagas that ended at or before ``cutoff_ns``, oldest
        first, taken off the heap: the primary proposes to forget them (and
        applies that at once, as every proposal)."""
        heap = self._ended
        out: dict[str, None] = {}  # ordered; an id pushed twice is taken once
        while heap and heap[0][0] <= cutoff_ns and len(out) < limit:
            end_ns, saga_id = heapq.heappop(heap)
            if self._ended_at(end_ns, saga_id):
                out[saga_id] = None
        return list(out)

    def _ended_at(self, end_ns: int, saga_id: str) -> bool:
        """Whether saga ``saga_id`` is here and ended at ``end_ns`` (a heap entry
        of a saga since forgotten, or of an older saga of the same id, is not)."""
        record = self.sagas.get(saga_id)
        return record is not None and saga_id not in self.active \
            and record.saga.end_time.ToNanoseconds() == end_ns

    def type_version(self, name: str, version: int) -> tuple[pb.SagaDefinition, int] | None:
        """Version ``version`` (0: the latest) of type ``name`` and its number."""
        found = self.types.get(name)
        if found is None or not found.versions or version > len(found.versions):
            return None
        number = version or len(found.versions)
        return found.versions[number - 1], number

    def snapshot(self) -> list[tuple[int, bytes]]:
        """Per slot, its sagas and types."""
        chunks: dict[int, spb.SagaSnapshotChunk] = {}
        for saga_id, record in self.sagas.items():
            chunks.setdefault(slot_for(saga_id), spb.SagaSnapshotChunk()).sagas.append(record)
        for name, found in self.types.items():
            chunks.setdefault(slot_for(name), spb.SagaSnapshotChunk()).types.append(found)
        return [(slot, chunk.SerializeToString()) for slot, chunk in sorted(chunks.items())]

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> list[Persist]:
        self._ended.clear()
        self.sagas.clear()
        self.active.clear()
        self.unpublished.clear()
        self.types.clear()
        self.changed.clear()
        for _, data in chunks:
            chunk = spb.SagaSnapshotChunk.FromString(data)
            for record in chunk.sagas:
                self._keep(record)
            for found in chunk.types:
                self.types[found.name] = found
        return self._storage.replace(self.sagas.values(), self.types.values())

    def role_changed(self) -> None:
        if self._on_change is not None and self._group.writable:
            # A new primary: its driver takes over every saga in flight (the
            # outbox: tasks decided but not yet enqueued, jobs not yet read).
            for saga_id in list(self.active | self.unpublished):
                self._on_change(self._group, saga_id)
        elif not self._group.writable and self._on_leave is not None:
            self._on_leave(self._group)

    def close(self) -> None:
        """The group leaves (or is rebuilt): forget the state (the rows stay on
        disk: whether they go is the replication layer's call)."""
        if self._on_leave is not None:
            self._on_leave(self._group)
        self._ended.clear()
        self.sagas.clear()
        self.active.clear()
        self.unpublished.clear()
        self.types.clear()
        self.changed.clear()
