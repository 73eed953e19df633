"""The primary's side of one group's event store: check a request, then propose.

The primary checks a request against the state (tombstone, idempotency, the
expected state) and, with no await in between, proposes the command: the
group applies it at once, exactly as replicas will (`EventsMachine.apply`),
which assigns versions and positions and queues the disk writes before the
commit point is computed. Two appends to one stream can therefore never both
pass an EXACT check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.slots import slot_for
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_replication_pb2 as epb
from nodes.events import errors
from nodes.events.machine import EVENTS, AppendResult, EventsMachine, first_kept
from nodes.events.model import POSITION, SEQ, VERSION, Stream
from nodes.events.store import EventStore

if TYPE_CHECKING:
    from nodes.replication.group import Group, Proposal

__all__ = ["SCAVENGE_BATCH", "EventsPrimary"]

SCAVENGE_BATCH = 10_000
"""Most events one scavenge command removes (later passes take the rest)."""


class EventsPrimary:
    """Decisions for one group this node leads (no state of its own)."""

    __slots__ = ("group", "machine")

    def __init__(self, group: Group, machine: EventsMachine) -> None:
        self.group = group
        self.machine = machine

    @property
    def store(self) -> EventStore:
        """The state decisions are checked against."""
        return self.machine.store

    def append(self, stream_id: str, events: Sequence[pb.EventData], expected: int,
               exact_version: int) -> AppendResult:
        stream = self.store.streams.get(stream_id)
        if stream is not None and stream.tombstoned:
            raise errors.stream_deleted(stream_id)
        duplicate = self._duplicate(stream_id, stream, events)
        if duplicate is not None:
            return duplicate
        self._check_expected(stream_id, stream, expected, exact_version)
        result: AppendResult = self._propose(stream_id, epb.EventsCommand(
            append=epb.AppendEvents(stream=stream_id, events=events))).result
        return result

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
        proposal = self._propose(stream_id, epb.EventsCommand(set_metadata=epb.SetMetadata(
            stream=stream_id, max_count=max_count, max_age_ns=max_age_ns,
            truncate_before=truncate_before)))
        return proposal.result, proposal.seq

    def delete(self, stream_id: str, expected: int, exact_version: int) -> tuple[int, int]:
        """Soft-delete; ``(last_version, seq)`` (no command if there is nothing to delete)."""
        stream = self.store.streams.get(stream_id)
        if stream is not None and stream.tombstoned:
            raise errors.stream_deleted(stream_id)
        self._check_expected(stream_id, stream, expected, exact_version)
        if stream is None or not stream.exists:
            return (stream.last_version, stream.changed_seq) if stream is not None else (0, 0)
        proposal = self._propose(stream_id, epb.EventsCommand(
            delete=epb.SoftDelete(stream=stream_id)))
        return proposal.result, proposal.seq

    def tombstone(self, stream_id: str, expected: int, exact_version: int) -> tuple[int, int]:
        """Hard-delete; ``(last_version, seq)``."""
        stream = self.store.streams.get(stream_id)
        if stream is not None and stream.tombstoned:
            raise errors.stream_deleted(stream_id)
        self._check_expected(stream_id, stream, expected, exact_version)
        last = stream.last_version if stream is not None else 0
        proposal = self._propose(stream_id, epb.EventsCommand(
            tombstone=epb.Tombstone(stream=stream_id)))
        return last, proposal.seq

    def scavenge(self, now_ns: int) -> int:
        """Propose commands removing events that retention hides; how many commands."""
        commit = self.group.commit_seq
        issued = 0
        streams = self.store.streams
        schedule = self.machine.scavenge_schedule()
        for stream_id in schedule.due(now_ns):
            stream = streams.get(stream_id)
            if stream is None or not stream.events:
                continue  # (an append puts it back)
            first = stream.events[0][VERSION]
            keep = min(first_kept(stream, commit, now_ns), first + SCAVENGE_BATCH)
            if keep > first:
                self._propose(stream_id, epb.EventsCommand(scavenge=epb.Scavenge(
                    stream=stream_id, before_version=keep)))  # applied at once
                issued += 1
            # Still due (more than a batch, or hidden but not yet committed):
            # the next pass, not this one again.
            schedule.put(stream, not_before=now_ns + 1)
        return issued

    def _propose(self, stream_id: str, command: epb.EventsCommand) -> Proposal:
        return self.group.propose(slot_for(stream_id), EVENTS, command.SerializeToString())

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
        first = hits[0][VERSION]
        if any(f[VERSION] != first + i for i, f in enumerate(hits)):
            raise errors.duplicate_event_id(
                stream_id, "the event ids are already in it, in another order or not "
                "contiguous")
        last = hits[-1]
        return AppendResult(first, last[VERSION], stream.slot, last[POSITION], True,
                            max(f[SEQ] for f in hits))

    @staticmethod
    def _check_expected(stream_id: str, stream: Stream | None, expected: int,
                        exact_version: int) -> None:
        exists = stream is not None and stream.exists
        current = stream.last_version if stream is not None else 0
        if (expected == pb.EXPECTED_STATE_NO_STREAM and exists) \
                or (expected == pb.EXPECTED_STATE_STREAM_EXISTS and not exists) \
                or (expected == pb.EXPECTED_STATE_EXACT and current != exact_version):
            raise errors.version_mismatch(stream_id, current, exists)
