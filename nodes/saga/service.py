"""The gRPC face of sagas: validation, routing to the saga's (or type's) group,
commit before answering; the driver (`nodes.saga.driver`) does the rest.

A saga lives in the group that owns its id's slot, a type in the group of its
name's. Every change is answered once committed (on the primary's disk and
acknowledged by every in-sync replica after theirs), and reads show only
committed state.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar, TypeAlias, TypeVar, cast

import grpc

from common import pagetoken, tenancy
from common.clock import SYSTEM_CLOCK, Clock, from_seconds
from common.errors import invalid_argument
from common.metrics import Snapshot, one
from common.slots import slot_for
from common.tenancy import scoped, unscoped
from mesh.saga.v1 import saga_pb2 as pb
from mesh.saga.v1 import saga_pb2_grpc as pb_grpc
from mesh.saga.v1 import saga_replication_pb2 as spb
from nodes.config import NodeConfig, SagaLimits
from nodes.forwarding import Forwarder
from nodes.internal_client import InternalClient
from nodes.pages import within_page
from nodes.planes import LOCAL_HEADER
from nodes.plugin import needs_journal
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.replication.machine import ServiceKind
from nodes.replication.manager import Redirect, Replication
from nodes.routing import Routed, routed
from nodes.rpc import ForwardedError, metadata_of
from nodes.saga import errors, progress
from nodes.saga import validation as v
from nodes.saga.driver import Driver
from nodes.saga.machine import SAGA, SagaMachine
from nodes.saga.storage import SCHEMA, TABLES

__all__ = ["SagaService"]

Ctx: TypeAlias = grpc.aio.ServicerContext
_Answer = TypeVar("_Answer")

_LIST = "sagas"
_TICK_SECONDS = 60.0
_FORGET_BATCH = 1000
_STATES = {
    pb.SAGA_STATE_RUNNING: "running", pb.SAGA_STATE_COMPENSATING: "compensating",
    pb.SAGA_STATE_COMPLETED: "completed", pb.SAGA_STATE_COMPENSATED: "compensated",
    pb.SAGA_STATE_NEEDS_ATTENTION: "needs_attention"}


def _machine(group: Group) -> SagaMachine:
    return cast(SagaMachine, group.machines[SAGA])


def _view(record: spb.SagaRecord, history: bool = True) -> pb.Saga:
    """The saga as its caller sees it: names without the tenant."""
    saga = pb.Saga()
    saga.CopyFrom(record.saga)
    saga.saga_id, saga.type = unscoped(saga.saga_id), unscoped(saga.type)
    if not history:
        del saga.history[:]
    return saga


class SagaService(Routed, pb_grpc.SagaServiceServicer):
    """SagaService over one `SagaMachine` per replica group."""

    name: ClassVar[str] = "saga"
    kind: ClassVar[ServiceKind] = SAGA
    durable: ClassVar[bool] = True
    descriptor = pb.DESCRIPTOR.services_by_name["SagaService"]

    def __init__(self, limits: SagaLimits, journal: Journal,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.limits = limits
        self.clock = clock
        self._journal = journal
        journal.create_tables(SCHEMA, TABLES)
        self.driver = Driver(limits, clock)
        self._replication: Replication | None = None
        self._client: InternalClient | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        """Saga id -> GetSaga calls waiting for it to end."""
        self.started_total = 0

    @classmethod
    def create(cls, config: NodeConfig, journal: Journal | None,
               clock: Clock = SYSTEM_CLOCK) -> SagaService:
        return cls(config.saga, needs_journal(journal, cls.name), clock)

    def machine(self, group: Group) -> SagaMachine:
        return SagaMachine(group, self._journal, self._changed, self._left)

    def _changed(self, group: Group, saga_id: str) -> None:
        self.driver.changed(group, saga_id)
        for event in self._waiters.get(saga_id, ()):
            event.set()

    def _left(self, group: Group) -> None:
        """The group is no longer led here: its work goes, and GetSaga calls
        waiting on its sagas end now (each sees the group is not led) rather
        than when their wait runs out. Rare enough to wake every waiter."""
        self.driver.forget_group(group)
        for events in self._waiters.values():
            for event in events:
                event.set()

    # -- lifecycle ---------------------------------------------------------------

    def start(self, replication: Replication, forwarder: Forwarder) -> None:
        self._replication = replication
        self.start_routing(forwarder)
        self._client = InternalClient(replication)
        self.driver.start(self._client, lambda group_id: cast(
            SagaMachine | None, replication.led_in(group_id, SAGA)))

    async def close(self) -> None:
        await self.driver.close()
        for events in self._waiters.values():
            for event in events:
                event.set()

    @property
    def tick_interval_ns(self) -> int:
        return from_seconds(_TICK_SECONDS)

    def tick(self, group: Group, now_ns: int) -> int | None:
        """Forget the sagas that ended more than the retention ago (a command:
        replicas never judge time themselves)."""
        machine = _machine(group)
        cutoff = now_ns - from_seconds(self.limits.retention)
        while gone := machine.ended_before(cutoff, _FORGET_BATCH):
            group.propose(0, SAGA, spb.SagaCommand(forgotten=spb.SagasForgotten(
                saga_ids=gone)).SerializeToString())
        return None

    def metrics(self, replication: Replication) -> Snapshot:
        counts = dict.fromkeys(_STATES.values(), 0)
        for machine in replication.led(SAGA):
            for record in cast(SagaMachine, machine).sagas.values():
                counts[_STATES.get(record.saga.state, "running")] += 1
        return Snapshot(
            gauges={f"mesh_saga_{state}": (f"Sagas {state.replace('_', ' ')} in led groups",
                                           one(n)) for state, n in counts.items()},
            counters={
                "mesh_saga_started": ("Sagas started through this node as primary",
                                      one(self.started_total)),
                "mesh_saga_driver_calls": ("Scheduler and event store calls made by the "
                                           "saga driver", one(self.driver.calls)),
            })

    # -- helpers -------------------------------------------------------------------

    @staticmethod
    async def _settled(group: Group, key: str, answer: _Answer) -> _Answer:
        """``answer``, just read from ``key``'s state (a saga or a type), once
        that state is committed. Read first, then wait: a change made during the
        wait (not yet committed) is not in it, and nothing is read from a group
        that may have left this node meanwhile."""
        await group.wait_committed(_machine(group).changed.get(key, 0))
        return answer

    def _still_led(self, group: Group) -> SagaMachine:
        """The group's sagas after an await: UNAVAILABLE (retry) if this node
        stopped leading the group meanwhile, whose machine is then gone (the
        group left) or no longer the primary's state."""
        return cast(SagaMachine, group.still_led(SAGA))

    def _internal(self) -> InternalClient:
        assert self._client is not None, "start() first"
        return self._client

    # -- types -------------------------------------------------------------------------

    async def RegisterSagaType(self, request: pb.RegisterSagaTypeRequest,
                               context: Ctx) -> pb.RegisterSagaTypeResponse:
        v.check_definition(request.definition)
        target = self.owner(request.definition.name, context)
        if isinstance(target, Redirect):
            response: pb.RegisterSagaTypeResponse = await self.forward(
                target, "RegisterSagaType", request, context)
            return response
        group = target
        definition = pb.SagaDefinition()
        definition.CopyFrom(request.definition)
        definition.name = scoped(definition.name)
        latest = _machine(group).type_version(definition.name, 0)
        if latest is not None and latest[0] == definition:
            return await self._settled(group, definition.name, pb.RegisterSagaTypeResponse(
                version=latest[1], unchanged=True))
        proposal = group.propose(slot_for(definition.name), SAGA, spb.SagaCommand(
            registered=spb.TypeRegistered(definition=definition)).SerializeToString())
        version: int = await proposal.committed()
        return pb.RegisterSagaTypeResponse(version=version)

    @routed("name")
    async def GetSagaType(self, request: pb.GetSagaTypeRequest, context: Ctx,
                          group: Group) -> pb.GetSagaTypeResponse:
        v.check_id(request.name, "name")
        name = scoped(request.name)
        found = _machine(group).type_version(name, request.version)
        if found is None:
            raise errors.type_not_found(name, request.version)
        definition = pb.SagaDefinition()
        definition.CopyFrom(found[0])
        definition.name = unscoped(definition.name)
        return await self._settled(group, name, pb.GetSagaTypeResponse(
            definition=definition, version=found[1]))

    # -- sagas -------------------------------------------------------------------------

    @routed("saga_id")
    async def StartSaga(self, request: pb.StartSagaRequest, context: Ctx,
                        group: Group) -> pb.StartSagaResponse:
        v.check_id(request.saga_id, "saga_id")
        v.check_id(request.type, "type")
        v.check_input(request.input)
        saga_id = scoped(request.saga_id)
        existing = _machine(group).sagas.get(saga_id)
        if existing is None:
            # The type may be led elsewhere: ask its primary (as this tenant).
            try:
                found = await self._internal().call(
                    request.type, "/mesh.saga.v1.SagaService/GetSagaType",
                    pb.GetSagaTypeRequest(name=request.type, version=request.version),
                    pb.GetSagaTypeResponse, tenancy.current(),
                    timeout=context.time_remaining() or 5.0)
            except grpc.aio.AioRpcError as exc:
                raise ForwardedError(exc) from None  # e.g. SAGA_TYPE_NOT_FOUND, as is
            definition = found.definition
            definition.name = scoped(definition.name)
            # The map may have moved on during the await: propose only in the
            # group that leads the saga's slot here and now.
            if self.owner_of_slot(slot_for(saga_id), context) is not group:
                raise errors.group_changed(group.group_id)
            # Checked again after the await: a retry may have started it meanwhile.
            existing = _machine(group).sagas.get(saga_id)
            if existing is None:
                record = progress.new_record(saga_id, definition, found.version,
                                             request.input, tenancy.current())
                proposal = group.propose(slot_for(saga_id), SAGA, spb.SagaCommand(
                    started=spb.SagaStarted(record=record)).SerializeToString())
                started: spb.SagaRecord = await proposal.committed()
                self.started_total += 1
                return pb.StartSagaResponse(saga=_view(started))
        saga = existing.saga
        if saga.type != scoped(request.type) or saga.input != request.input or (
                request.version and request.version != saga.version):
            raise errors.saga_exists(saga_id, f"type {unscoped(saga.type)!r} version "
                                              f"{saga.version} and another input")
        return await self._settled(group, saga_id, pb.StartSagaResponse(
            saga=_view(existing), existed=True))

    @routed("saga_id")
    async def GetSaga(self, request: pb.GetSagaRequest, context: Ctx,
                      group: Group) -> pb.GetSagaResponse:
        v.check_id(request.saga_id, "saga_id")
        wait_ns = v.wait_ns(request)
        saga_id = scoped(request.saga_id)
        machine = _machine(group)
        if saga_id not in machine.sagas:
            raise errors.saga_not_found(saga_id)
        if wait_ns and saga_id in machine.active:
            event = asyncio.Event()
            self._waiters.setdefault(saga_id, set()).add(event)
            try:
                async with asyncio.timeout(wait_ns / 1e9):
                    while saga_id in machine.active and group.writable:
                        event.clear()
                        await event.wait()
            except TimeoutError:
                pass
            finally:
                waiting = self._waiters.get(saga_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[saga_id]
        # (The wait ends early when the group stops being led here: its machine
        # is then not the primary's, or gone, and is no answer.)
        record = self._still_led(group).sagas.get(saga_id)
        if record is None:
            raise errors.saga_not_found(saga_id)
        return await self._settled(group, saga_id, pb.GetSagaResponse(saga=_view(record)))

    @routed("saga_id")
    async def CancelSaga(self, request: pb.CancelSagaRequest, context: Ctx,
                         group: Group) -> pb.CancelSagaResponse:
        v.check_id(request.saga_id, "saga_id")
        saga_id = scoped(request.saga_id)
        record = _machine(group).sagas.get(saga_id)
        if record is None:
            raise errors.saga_not_found(saga_id)
        state = record.saga.state
        if state in progress.FINAL:
            raise errors.saga_finished(saga_id, _STATES[state])
        if state == pb.SAGA_STATE_RUNNING:
            proposal = group.propose(slot_for(saga_id), SAGA, spb.SagaCommand(
                cancel=spb.CancelRequested(saga_id=saga_id,
                                           reason=v.reason_text(request.reason)))
                .SerializeToString())
            await proposal.committed()
            # The cancel changed this record in place and stands: answered from
            # it even if the group left this node as it committed.
            return pb.CancelSagaResponse(saga=_view(record))
        return await self._settled(group, saga_id, pb.CancelSagaResponse(saga=_view(record)))

    @routed("saga_id")
    async def ReportStep(self, request: pb.ReportStepRequest, context: Ctx,
                         group: Group) -> pb.ReportStepResponse:
        v.check_id(request.saga_id, "saga_id")
        if not request.job_id or len(request.job_id) > 1024:
            raise invalid_argument("job_id", "must hold 1 to 1024 characters")
        self.driver.reported(group, scoped(request.saga_id), request.job_id)
        return pb.ReportStepResponse()

    async def ListSagas(self, request: pb.ListSagasRequest,
                        context: Ctx) -> pb.ListSagasResponse:
        size = v.page_size(request.page_size)
        if request.type:
            v.check_id(request.type, "type")
        after = pagetoken.decode(request.page_token, _LIST, (str,))
        after_id = "" if after is None else after[0]
        if LOCAL_HEADER in metadata_of(context):
            return await self._list_here(request, after_id, size)
        # Every node lists the groups it leads; the merge takes the first page.
        client = self._internal()
        local = pb.ListSagasRequest(state=request.state, type=request.type, page_size=size,
                                    page_token=request.page_token)
        try:
            answers = await asyncio.gather(*(
                client.call("", "/mesh.saga.v1.SagaService/ListSagas", local,
                            pb.ListSagasResponse, tenancy.current(), address=address,
                            timeout=context.time_remaining() or 5.0,
                            extra=((LOCAL_HEADER, "1"),))
                for address in client.peer_addresses()))
        except grpc.aio.AioRpcError as exc:
            raise ForwardedError(exc) from None
        sagas = sorted((s for answer in answers for s in answer.sagas),
                       key=lambda s: s.saga_id)
        # A node whose page was cut (by count or by bytes) may hold sagas just after
        # its last one: the merged page stops there, or the next would skip them.
        ends = [answer.sagas[-1].saga_id for answer in answers
                if answer.next_page_token and answer.sagas]
        if ends:
            sagas = [s for s in sagas if s.saga_id <= min(ends)]
        page = within_page(sagas[:size])
        response = pb.ListSagasResponse(sagas=page)
        if page and (len(sagas) > len(page) or ends):
            response.next_page_token = pagetoken.encode(_LIST, page[-1].saga_id)
        return response

    async def _list_here(self, request: pb.ListSagasRequest, after_id: str,
                         size: int) -> pb.ListSagasResponse:
        """The sagas of the groups this node leads, once what they hold is committed."""
        assert self._replication is not None
        prefix = tenancy.prefix()
        kind = scoped(request.type) if request.type else ""
        found: list[spb.SagaRecord] = []
        led = self._replication.led(SAGA)
        for machine in led:
            group = machine.group if isinstance(machine, SagaMachine) else None
            if group is not None and group.log.last_seq > group.commit_seq:
                await group.wait_committed(group.log.last_seq)
        for machine in led:  # one that left meanwhile was emptied: a page would skip its sagas
            cast(SagaMachine, machine).group.still_led(SAGA)
        for machine in led:
            for saga_id, record in cast(SagaMachine, machine).sagas.items():
                if prefix and not saga_id.startswith(prefix):
                    continue
                if unscoped(saga_id) <= after_id:
                    continue
                if request.state and record.saga.state != request.state:
                    continue
                if kind and record.saga.type != kind:
                    continue
                found.append(record)
        found.sort(key=lambda r: unscoped(r.saga.saga_id))
        page = within_page([_view(r, history=False) for r in found[:size]])
        response = pb.ListSagasResponse(sagas=page)
        if len(found) > len(page):
            response.next_page_token = pagetoken.encode(
                _LIST, unscoped(found[len(page) - 1].saga.saga_id))
        return response
