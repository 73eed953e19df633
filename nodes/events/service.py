"""The gRPC face of the event store: validation, routing to the stream's group,
commit before answering, reads and subscriptions from the committed state.

A stream lives in the group that owns its id's slot and only that group's
primary serves it; requests for slots led elsewhere are redirected or
forwarded (nodes/forwarding.py). Writes are answered once committed: on the
primary's disk and acknowledged by every in-sync replica after theirs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, ClassVar, TypeAlias, cast

import grpc

from common import heartbeat as hb
from common import tenancy
from common.clock import SYSTEM_CLOCK, Clock, from_seconds
from common.errors import MeshStatusError, ServiceError, invalid_argument
from common.metrics import Snapshot, one
from common.slots import slot_for
from common.tenancy import scoped
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_pb2_grpc as pb_grpc
from nodes.batches import Waits, answer_all, item_error, route_items, settle
from nodes.config import EventsLimits, NodeConfig
from nodes.events import errors
from nodes.events import validation as v
from nodes.events.machine import EVENTS, EventsMachine
from nodes.events.model import LIVE, Stream
from nodes.events.primary import EventsPrimary
from nodes.events.reads import View, read_slot, read_stream, recorded
from nodes.events.storage import SCHEMA, TABLES
from nodes.events.subscriptions import (
    SHUTDOWN,
    Ended,
    SlotTarget,
    SubscriptionHub,
    follow_slots,
    follow_stream,
    start_version,
)
from nodes.forwarding import Forwarder
from nodes.plugin import needs_journal
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.replication.machine import ServiceKind
from nodes.replication.manager import Redirect, Replication
from nodes.routing import Routed, by_slot, routed, routed_stream

__all__ = ["EventsService"]

MAX_APPENDS = 1000
"""Appends of one AppendMany at most."""


log = logging.getLogger(__name__)

Ctx: TypeAlias = grpc.aio.ServicerContext

_DEFAULT_CHECKPOINT_INTERVAL = 1000


def _machine(group: Group) -> EventsMachine:
    return cast(EventsMachine, group.machines[EVENTS])


def _primary(group: Group) -> EventsPrimary:
    return EventsPrimary(group, _machine(group))


def _confirmation(sub_id: str, heartbeat: float) -> pb.SubscribeResponse:
    confirmation = pb.SubscriptionConfirmation(subscription_id=sub_id)
    if heartbeat > 0:
        confirmation.heartbeat_interval.CopyFrom(hb.as_duration(heartbeat))
    return pb.SubscribeResponse(confirmation=confirmation)


class EventsService(Routed, pb_grpc.EventsServiceServicer):
    """EventsService over one `EventsMachine` per replica group; a stream lives
    where its name's slot is led."""

    name: ClassVar[str] = "events"
    kind: ClassVar[ServiceKind] = EVENTS
    durable: ClassVar[bool] = True
    descriptor = pb.DESCRIPTOR.services_by_name["EventsService"]

    def __init__(self, limits: EventsLimits, journal: Journal,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.limits = limits
        self.clock = clock  # retention (what is hidden, what is scavenged) is judged by it
        self._journal = journal
        journal.create_tables(SCHEMA, TABLES)
        self.hub = SubscriptionHub(limits.max_subscriptions)
        self.appended_total = 0
        """Events appended through this node as primary (for metrics)."""
        self._replication: Replication | None = None

    @classmethod
    def create(cls, config: NodeConfig, journal: Journal | None,
               clock: Clock = SYSTEM_CLOCK) -> EventsService:
        return cls(config.events, needs_journal(journal, cls.name), clock)

    def machine(self, group: Group) -> EventsMachine:
        """The event store state machine for a group (the replication layer's factory)."""
        return EventsMachine(group, self._journal, self.hub.end_group)

    # -- lifecycle ---------------------------------------------------------------

    def start(self, replication: Replication, forwarder: Forwarder) -> None:
        self._replication = replication
        self.start_routing(forwarder)

    async def close(self) -> None:
        """End every subscription."""
        await self.hub.shutdown()

    def metrics(self, replication: Replication) -> Snapshot:
        streams = sum(len(cast(EventsMachine, m).store.streams)
                      for m in replication.led(EVENTS))
        return Snapshot(
            gauges={
                "mesh_events_streams": ("Event streams in led groups", one(streams)),
                "mesh_events_subscriptions": ("Open Subscribe streams on this node",
                                              one(len(self.hub))),
            },
            counters={"mesh_events_appended": ("Events appended through this node as primary",
                                               one(self.appended_total))},
        )

    @property
    def tick_interval_ns(self) -> int:
        return from_seconds(self.limits.scavenge_interval)

    def tick(self, group: Group, now_ns: int) -> int | None:
        # Retention hides events at once; removing them (memory and disk) is a
        # replicated command like any write, proposed by the primary now and then.
        _primary(group).scavenge(now_ns)
        return None

    # -- commits -------------------------------------------------------------------

    async def _committed(self, group: Group, seq: int) -> None:
        """Wait for ``seq`` to commit, then wake the group's subscriptions."""
        try:
            await group.wait_committed(seq)
        except asyncio.CancelledError:
            # The caller left, but the write goes on: subscribers must still
            # hear of it when it commits.
            self.hub.notify_when_committed(group, seq)
            raise
        self.hub.notify(group.group_id)

    @staticmethod
    async def _settled(group: Group, stream: Stream) -> None:
        """Return once ``stream``'s settings and state, as just read, are
        committed. Callers read first, then wait: a change made during the wait
        (not yet committed) is not in their answer, and nothing is read from a
        group that may have left this node meanwhile."""
        await group.wait_committed(stream.changed_seq)

    # -- writes ------------------------------------------------------------------

    @routed("stream")
    async def Append(self, request: pb.AppendRequest, context: Ctx,
                     group: Group) -> pb.AppendResponse:
        v.check_stream(request.stream)
        v.check_events(request.events, self.limits)
        expected = v.check_expected(request.expected_state, request.exact_version)
        result = _primary(group).append(scoped(request.stream), request.events, expected,
                                         request.exact_version)
        await self._committed(group, result.seq)
        if not result.duplicate:
            self.appended_total += result.last_version - result.first_version + 1
        return pb.AppendResponse(
            first_version=result.first_version, last_version=result.last_version,
            slot=result.slot, position=result.position, duplicate=result.duplicate)

    async def AppendMany(self, request: pb.AppendManyRequest, context: Ctx
                         ) -> pb.AppendManyResponse:
        appends = request.appends
        if not appends or len(appends) > MAX_APPENDS:
            raise invalid_argument("appends", f"must hold 1 to {MAX_APPENDS} appends")
        errors_: dict[int, pb.ItemError] = {}
        checked: list[str | None] = []
        expected: dict[int, int] = {}
        for i, a in enumerate(appends):
            try:
                v.check_stream(a.stream)
                v.check_events(a.events, self.limits)
                expected[i] = v.check_expected(a.expected_state, a.exact_version)
                checked.append(a.stream)
            except MeshStatusError as exc:
                errors_[i] = item_error(exc, f"appends[{i}].", pb.ItemError)
                checked.append(None)
        routes = route_items(checked, lambda stream: self.owner(stream, context), errors_,
                             pb.ItemError)
        answers: dict[int, pb.AppendResponse] = {}
        waits: Waits = {}
        for group, indexes in routes.local.values():
            # Proposed back to back: replication carries them together.
            top, done = 0, waits.setdefault(group, [])
            for i in indexes:
                a = appends[i]
                try:
                    result = _primary(group).append(scoped(a.stream), a.events, expected[i],
                                                     a.exact_version)
                except ServiceError as exc:
                    errors_[i] = item_error(exc, kind=pb.ItemError)
                    continue
                if not result.duplicate:
                    self.appended_total += result.last_version - result.first_version + 1
                answers[i] = pb.AppendResponse(
                    first_version=result.first_version, last_version=result.last_version,
                    slot=result.slot, position=result.position, duplicate=result.duplicate)
                top = max(top, result.seq)
                done.append((i, result.seq))
            # Subscribers hear of the appends once committed, even if this call
            # goes away first.
            self.hub.notify_when_committed(group, top)

        def forward(target: Redirect, indexes: list[int]) -> Awaitable[Any]:
            share = pb.AppendManyRequest(appends=[appends[i] for i in indexes])
            return self.forward(target, "AppendMany", share, context)

        await settle(routes, waits, forward, answers, errors_, "appended", "appends",
                     pb.ItemError)
        return answer_all(pb.AppendManyResponse(), len(appends), answers, errors_, "appended")

    @routed("stream")
    async def SetStreamMetadata(self, request: pb.SetStreamMetadataRequest, context: Ctx,
                                group: Group) -> pb.SetStreamMetadataResponse:
        v.check_stream(request.stream)
        settings = v.check_metadata(request.metadata)
        expected = request.expected_metadata_version \
            if request.HasField("expected_metadata_version") else None
        version, seq = _primary(group).set_metadata(scoped(request.stream), settings,
                                                     expected)
        await self._committed(group, seq)
        return pb.SetStreamMetadataResponse(metadata_version=version)

    @routed("stream")
    async def DeleteStream(self, request: pb.DeleteStreamRequest, context: Ctx,
                           group: Group) -> pb.DeleteStreamResponse:
        v.check_stream(request.stream)
        expected = v.check_expected(request.expected_state, request.exact_version)
        last, seq = _primary(group).delete(scoped(request.stream), expected,
                                            request.exact_version)
        await self._committed(group, seq)
        return pb.DeleteStreamResponse(last_version=last)

    @routed("stream")
    async def TombstoneStream(self, request: pb.TombstoneStreamRequest, context: Ctx,
                              group: Group) -> pb.TombstoneStreamResponse:
        v.check_stream(request.stream)
        expected = v.check_expected(request.expected_state, request.exact_version)
        last, seq = _primary(group).tombstone(scoped(request.stream), expected,
                                               request.exact_version)
        await self._committed(group, seq)
        return pb.TombstoneStreamResponse(last_version=last)

    # -- reads -------------------------------------------------------------------

    @routed("stream")
    async def Read(self, request: pb.ReadRequest, context: Ctx,
                   group: Group) -> pb.ReadResponse:
        v.check_stream(request.stream)
        backward = v.direction(request.direction)
        limit = v.page_size(request.max_count)
        store = _machine(group).store
        stream = store.streams.get(scoped(request.stream))
        if stream is None:
            return pb.ReadResponse(end_of_stream=True)
        if stream.tombstoned:
            await self._settled(group, stream)
            raise errors.stream_deleted(request.stream)
        view = View(store, group.commit_seq, self.clock.wall_ns())
        start = request.from_version if request.HasField("from_version") else None
        page = read_stream(stream, view, start, backward, limit)
        last = view.bounds(stream)[1]
        response = pb.ReadResponse(next_version=page.next, end_of_stream=page.end,
                                   last_version=last,
                                   stream_exists=last > 0 and stream.state == LIVE)
        recorded(page.events, response.events)
        await self._settled(group, stream)
        return response

    @by_slot("slot")
    async def ReadAll(self, request: pb.ReadAllRequest, context: Ctx,
                      group: Group) -> pb.ReadAllResponse:
        backward = v.direction(request.direction)
        limit = v.page_size(request.max_count)
        store = _machine(group).store
        slot_log = store.slots.get(request.slot)
        if slot_log is None:
            return pb.ReadAllResponse(end_of_log=True)
        view = View(store, group.commit_seq, self.clock.wall_ns())
        start = request.from_position if request.HasField("from_position") else None
        page = read_slot(slot_log, view, start, backward, limit)
        response = pb.ReadAllResponse(
            next_position=page.next, end_of_log=page.end,
            last_position=slot_log.committed_last(group.commit_seq))
        recorded(page.events, response.events)
        return response

    @routed("stream")
    async def GetStreamMetadata(self, request: pb.GetStreamMetadataRequest, context: Ctx,
                                group: Group) -> pb.GetStreamMetadataResponse:
        v.check_stream(request.stream)
        stream = _machine(group).store.streams.get(scoped(request.stream))
        if stream is None:
            return pb.GetStreamMetadataResponse()
        if stream.tombstoned:
            await self._settled(group, stream)
            raise errors.stream_deleted(request.stream)
        metadata = pb.StreamMetadata(max_count=stream.max_count,
                                     truncate_before=stream.truncate_before)
        if stream.max_age_ns:
            metadata.max_age.FromNanoseconds(stream.max_age_ns)
        answer = pb.GetStreamMetadataResponse(metadata=metadata,
                                              metadata_version=stream.metadata_version)
        await self._settled(group, stream)
        return answer

    # -- subscriptions -------------------------------------------------------------

    async def Subscribe(self, request: pb.SubscribeRequest, context: Ctx
                        ) -> AsyncIterator[pb.SubscribeResponse]:
        kind = request.WhichOneof("target")
        if kind is None:
            raise invalid_argument("target", "give one of stream, category or all")
        if request.start not in pb.SubscribeStart.values():
            raise invalid_argument("start", f"unknown start {request.start}")
        from_end = request.start == pb.SUBSCRIBE_START_END
        heartbeat = hb.interval(
            "heartbeat_interval",
            request.heartbeat_interval if request.HasField("heartbeat_interval") else None,
            self.limits.heartbeat_interval)
        if kind == "stream":
            stream = request.stream
            v.check_stream(stream)
            messages = self._subscribe_stream(request, context, from_end=from_end,
                                              heartbeat=heartbeat)
        else:
            prefix = tenancy.prefix()  # all: every stream of the caller's tenant
            if kind == "category":
                v.check_stream(request.category, "category")
                prefix = scoped(request.category)
            interval = request.checkpoint_interval or _DEFAULT_CHECKPOINT_INTERVAL
            targets = self._slot_targets(v.subscribe_slots(request.slots))
            cursors = self._cursors(targets, dict(request.after_positions), from_end)
            messages = self._follow_slots(targets, cursors, prefix, interval, heartbeat)
        async for message in messages:
            yield message

    @routed_stream("stream", method="Subscribe")
    async def _subscribe_stream(self, request: pb.SubscribeRequest, context: Ctx,
                                group: Group, *, from_end: bool = False, heartbeat: float = 0.0
                                ) -> AsyncIterator[pb.SubscribeResponse]:
        stream, after_version = scoped(request.stream), request.after_version
        machine = _machine(group)
        sub = self.hub.open(frozenset({group.group_id}))
        cursor = start_version(machine, stream, after_version, from_end)
        try:
            yield _confirmation(sub.id, heartbeat)
            async for message in follow_stream(sub, machine, stream, cursor,
                                               self.limits.subscriber_max_lag, heartbeat,
                                               self.clock):
                yield message
        except Ended as ended:
            raise self._ended(ended.group_id, slot_for(stream)) from None
        finally:
            self.hub.close(sub)

    async def _follow_slots(self, targets: list[SlotTarget], cursors: dict[int, int],
                            prefix: str, interval: int, heartbeat: float
                            ) -> AsyncIterator[pb.SubscribeResponse]:
        sub = self.hub.open(frozenset(t.group_id for t in targets))
        try:
            yield _confirmation(sub.id, heartbeat)
            async for message in follow_slots(sub, targets, cursors, prefix, interval,
                                              self.limits.subscriber_max_lag, heartbeat,
                                              self.clock):
                yield message
        except Ended as ended:
            slot = next((min(t.slots) for t in targets if t.group_id == ended.group_id), 0)
            raise self._ended(ended.group_id, slot) from None
        finally:
            self.hub.close(sub)

    def _slot_targets(self, slots: list[int]) -> list[SlotTarget]:
        """The local groups leading ``slots``; WRONG_OWNER if any is led elsewhere."""
        replication = self._replication
        assert replication is not None, "start() first"
        table = replication.table
        if table is None:
            replication.resolve(slots[0])  # raises NO_MAP
        assert table is not None
        by_group: dict[int, list[int]] = {}
        for slot in slots:
            view = table.group_of_slot(slot)
            by_group.setdefault(view.group_id if view is not None else -1, []).append(slot)
        targets = []
        for group_id, group_slots in by_group.items():
            group = self.here(group_slots[0])  # one lookup per group
            targets.append(SlotTarget(group_id, _machine(group), frozenset(group_slots)))
        return targets

    @staticmethod
    def _cursors(targets: list[SlotTarget], after: dict[int, int], from_end: bool
                 ) -> dict[int, int]:
        cursors: dict[int, int] = {}
        for target in targets:
            logs, commit = target.machine.store.slots, target.machine.group.commit_seq
            for slot in target.slots:
                if slot in after:
                    cursors[slot] = after[slot]
                elif from_end and slot in logs:
                    cursors[slot] = logs[slot].committed_last(commit)
                else:
                    cursors[slot] = 0
        return cursors

    def _ended(self, group_id: int, slot: int) -> MeshStatusError | ServiceError:
        """Why a subscription ended: the node stops, the slot moved, or its group is
        changing primary."""
        if group_id == SHUTDOWN or self._replication is None:
            return errors.shutting_down()
        try:
            self.here(slot)
        except MeshStatusError as exc:
            return exc  # the slot moved (WRONG_OWNER), or its group has no primary now
        return errors.subscription_ended(group_id)
