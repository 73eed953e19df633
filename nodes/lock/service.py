"""The gRPC face of locks: validation, routing to the name's group, commit before answering.

A lock lives in the group that owns its name's slot, and only that group's
primary serves it. Every change is answered once committed (held by every
in-sync replica): a holder never learns of a lease a failover could forget.
Describe and Validate answer once everything they read is committed, so they
never report a decision that could still be lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar, cast

import grpc
from google.protobuf import timestamp_pb2

from common.clock import SYSTEM_CLOCK, Clock, from_seconds
from common.errors import MeshStatusError, ServiceError, capped
from common.metrics import Snapshot, one
from common.slots import slot_for
from common.tenancy import scoped
from mesh.lock.v1 import lock_pb2 as pb
from mesh.lock.v1 import lock_pb2_grpc as pb_grpc
from nodes.batches import Waits, uncommitted
from nodes.config import LockLimits, NodeConfig
from nodes.forwarding import Forwarder
from nodes.lock import errors
from nodes.lock import validation as v
from nodes.lock.machine import LOCK, LockMachine
from nodes.lock.primary import LockPrimary
from nodes.lock.table import Lease, LeaseCount
from nodes.lock.waiters import Grant, Waiter
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.replication.machine import ServiceKind
from nodes.replication.manager import Redirect, Replication
from nodes.routing import Routed, routed
from nodes.rpc import ForwardedError

__all__ = ["LockService"]

Ctx: TypeAlias = grpc.aio.ServicerContext
Item = TypeVar("Item", pb.AcquireRequest, pb.ReleaseRequest)
Answer = TypeVar("Answer", pb.AcquireResponse, pb.ReleaseResponse)
Outcome = TypeVar("Outcome", pb.AcquireOutcome, pb.ReleaseOutcome)

# Answer LOCK_TIMEOUT this long before the call's own deadline, so the caller
# gets a definite answer rather than DEADLINE_EXCEEDED.
_DEADLINE_MARGIN = 0.1


def _timestamp(at_ns: int) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(at_ns)
    return timestamp


def _primary(group: Group) -> LockPrimary:
    return cast(LockMachine, group.machines[LOCK]).primary


class LockService(Routed, pb_grpc.LockServiceServicer):
    """LockService over one `LockMachine` per replica group; a lock lives where
    its name's slot is led."""

    name: ClassVar[str] = "lock"
    kind: ClassVar[ServiceKind] = LOCK
    durable: ClassVar[bool] = False
    descriptor = pb.DESCRIPTOR.services_by_name["LockService"]
    tick_interval_ns = 0  # leases expire by their own timers (`LockPrimary`)

    def __init__(self, limits: LockLimits, clock: Clock = SYSTEM_CLOCK) -> None:
        self.limits = limits
        self.leases = LeaseCount()
        self.clock = clock

    def machine(self, group: Group) -> LockMachine:
        """The lock state machine for a group (the replication layer's factory)."""
        return LockMachine(group, self.limits, self.leases, self.clock)

    @classmethod
    def create(cls, config: NodeConfig, journal: Journal | None,
               clock: Clock = SYSTEM_CLOCK) -> LockService:
        return cls(config.lock, clock)

    def start(self, replication: Replication, forwarder: Forwarder) -> None:
        self.start_routing(forwarder)

    async def close(self) -> None:
        """Nothing to end: waiting Acquires end with the server's calls."""

    def tick(self, group: Group, now_ns: int) -> int | None:
        return None

    def metrics(self, replication: Replication) -> Snapshot:
        machines = [cast(LockMachine, m) for m in replication.led(LOCK)]
        return Snapshot(gauges={
            "mesh_lock_leases": ("Live lock leases in led groups (holders)",
                                 one(sum(m.table.size for m in machines))),
            "mesh_lock_waiters": ("Acquire calls queued on this node", one(
                sum(len(q) for m in machines for q in m.primary.queues.values()))),
        })

    # -- RPCs ------------------------------------------------------------------

    @routed("name")
    async def Acquire(self, request: pb.AcquireRequest, context: Ctx,
                      group: Group) -> pb.AcquireResponse:
        wait = v.wait(request.wait_timeout)
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, remaining - _DEADLINE_MARGIN)
        return await self._acquire(request, group, wait)

    async def _acquire(self, request: pb.AcquireRequest, group: Group,
                       wait: float) -> pb.AcquireResponse:
        """An Acquire served here, waiting up to ``wait`` seconds in the queue."""
        primary, name, outcome = self._decide_acquire(request, group, wait)
        grant = await self._wait(primary, name, outcome, wait) \
            if isinstance(outcome, Waiter) else outcome
        try:
            await group.wait_committed(grant.seq)
        except asyncio.CancelledError:
            primary.abandon(name, grant.lease)
            raise
        return _acquired(grant.lease)

    def _decide_acquire(self, request: pb.AcquireRequest, group: Group,
                        wait: float) -> tuple[LockPrimary, str, Grant | Waiter]:
        """Check an Acquire and decide it: granted (proposed), or queued for up to
        ``wait`` seconds; its primary and scoped name with it."""
        name = request.name
        v.check_name(name)
        v.check_owner(request.owner)
        v.check_request_id(request.request_id)
        ttl = v.ttl(request.ttl, self.limits, default=self.limits.default_ttl)
        assert ttl is not None
        permits, max_permits = v.permits(request.permits, request.max_permits)
        shared = v.shared(request.mode, permits, max_permits)
        name = scoped(name)
        primary = _primary(group)
        return primary, name, primary.acquire(
            name, owner=request.owner, permits=permits, max_permits=max_permits,
            ttl_ns=from_seconds(ttl), request_id=request.request_id,
            wait_ns=from_seconds(wait), shared=shared)

    def _acquire_now(self, request: pb.AcquireRequest,
                     group: Group) -> Decision[pb.AcquireResponse]:
        """A batch's Acquire: granted at once, else LOCK_TIMEOUT (batches never wait)."""
        primary, name, outcome = self._decide_acquire(request, group, 0.0)
        if isinstance(outcome, Waiter):  # a retry took its earlier try's place in the queue
            primary.leave(name, outcome)
            raise errors.lock_timeout(name, primary.table.token_bound(name),
                                      len(primary.queues.get(name) or ()))
        lease = outcome.lease
        return Decision(outcome.seq, lambda: _acquired(lease),
                        lambda: primary.abandon(name, lease))

    @staticmethod
    async def _wait(primary: LockPrimary, name: str, waiter: Waiter, wait: float) -> Grant:
        """Wait in the queue; leave it on timeout or cancellation."""
        future = waiter.future
        try:
            await asyncio.wait({future}, timeout=max(wait, 0.0))
        except asyncio.CancelledError:
            primary.leave(name, waiter)
            if future.done() and not future.cancelled() and future.exception() is None:
                primary.abandon(name, future.result().lease)
            raise
        if not future.done():
            primary.leave(name, waiter)
            raise errors.lock_timeout(name, primary.table.token_bound(name),
                                      len(primary.queues.get(name) or ()))
        return future.result()

    @routed("name")
    async def Release(self, request: pb.ReleaseRequest, context: Ctx,
                      group: Group) -> pb.ReleaseResponse:
        return await self._release(request, group)

    @staticmethod
    async def _release(request: pb.ReleaseRequest, group: Group) -> pb.ReleaseResponse:
        await group.wait_committed(_decide_release(request, group))
        return pb.ReleaseResponse()

    @staticmethod
    def _release_now(request: pb.ReleaseRequest, group: Group) -> Decision[pb.ReleaseResponse]:
        return Decision(_decide_release(request, group), pb.ReleaseResponse)

    # -- batches -----------------------------------------------------------------
    #
    # Every request of a batch led here is decided in turn, without awaiting, so
    # all their commands leave for the replicas together; then the batch awaits
    # their commits as every batch call does (`nodes.batches.uncommitted`: a
    # future per group), and each gets its own outcome. The requests for locks
    # led elsewhere go on to their owners, one batch per owner (a client whose
    # map is current sends none).

    async def AcquireBatch(self, request: pb.AcquireBatchRequest,
                           context: Ctx) -> pb.AcquireBatchResponse:
        v.check_batch(request.requests, "requests")
        outcomes = await self._batch(
            request.requests, context, "AcquireBatch",
            lambda items: pb.AcquireBatchRequest(requests=items), self._acquire_now,
            lambda granted: pb.AcquireOutcome(granted=granted),
            lambda error: pb.AcquireOutcome(error=error))
        return pb.AcquireBatchResponse(outcomes=outcomes)

    async def ReleaseBatch(self, request: pb.ReleaseBatchRequest,
                           context: Ctx) -> pb.ReleaseBatchResponse:
        v.check_batch(request.requests, "requests")
        outcomes = await self._batch(
            request.requests, context, "ReleaseBatch",
            lambda items: pb.ReleaseBatchRequest(requests=items), self._release_now,
            lambda _released: pb.ReleaseOutcome(),
            lambda error: pb.ReleaseOutcome(error=error))
        return pb.ReleaseBatchResponse(outcomes=outcomes)

    async def _batch(self, items: Sequence[Item], context: Ctx, method: str,
                     make: Callable[[list[Item]], Any],
                     decide: Callable[[Item, Group], Decision[Answer]],
                     done: Callable[[Answer], Outcome],
                     failed: Callable[[pb.BatchError], Outcome]) -> list[Outcome]:
        """Each of ``items``: decided by ``decide`` where its lock is led here and
        answered once committed, else in a ``method`` batch (``make``) to its owner;
        an item's error (bad input, no primary, not committed) is its outcome."""
        outcomes: list[Outcome | None] = [None] * len(items)
        decided: dict[int, Decision[Answer]] = {}
        waits: Waits = {}
        remote: dict[str, tuple[Redirect, list[int]]] = {}
        for i, item in enumerate(items):
            try:
                target = self.owner(item.name, context)
                if isinstance(target, Redirect):
                    remote.setdefault(target.owner_address, (target, []))[1].append(i)
                    continue
                decision = decide(item, target)
            except (MeshStatusError, ServiceError) as error:
                outcomes[i] = failed(_batch_error(error, f"requests[{i}]"))
                continue
            decided[i] = decision
            waits.setdefault(target, []).append((i, decision.seq))
        forwards: dict[str, asyncio.Future[Any]] = {
            address: asyncio.ensure_future(
                self.forward(target, method, make([items[i] for i in indexes]), context))
            for address, (target, indexes) in remote.items()}
        try:
            refused = await uncommitted(waits)
            if forwards:
                await asyncio.wait(forwards.values())
        except BaseException as exc:
            for forward in forwards.values():
                forward.cancel()
            if isinstance(exc, asyncio.CancelledError):
                for decision in decided.values():
                    decision.abandon()  # a lease granted to a caller who never heard of it
            raise
        for i, decision in decided.items():
            refusal = refused.get(i)
            outcomes[i] = done(decision.answer()) if refusal is None \
                else failed(_batch_error(refusal, f"requests[{i}]"))
        for address, forward in forwards.items():
            indexes = remote[address][1]
            if isinstance(failure := forward.exception(), ForwardedError):
                whole = pb.BatchError(code=failure.error.code().value[0],
                                      message=capped(failure.error.details() or "", 400))
                for i in indexes:
                    outcomes[i] = failed(whole)
            elif failure is not None:
                raise failure
            else:
                for i, outcome in zip(indexes, forward.result().outcomes, strict=True):
                    outcomes[i] = outcome
        answered = [outcome for outcome in outcomes if outcome is not None]
        assert len(answered) == len(items), "every request gets an outcome"
        return answered

    @routed("name")
    async def Refresh(self, request: pb.RefreshRequest, context: Ctx,
                      group: Group) -> pb.RefreshResponse:
        v.check_name(request.name)
        v.check_lease_id(request.lease_id)
        ttl = v.ttl(request.ttl, self.limits, default=None)
        lease, seq = _primary(group).refresh(scoped(request.name), request.lease_id,
                                             None if ttl is None else from_seconds(ttl))
        await group.wait_committed(seq)
        return pb.RefreshResponse(expire_time=_timestamp(lease.expire_ns),
                                  fencing_token=lease.token)

    @routed("name")
    async def Describe(self, request: pb.DescribeRequest, context: Ctx,
                       group: Group) -> pb.DescribeResponse:
        name = request.name
        v.check_name(name)
        name = scoped(name)
        primary = _primary(group)
        lock = primary.table.get(name)
        queue = primary.queues.get(name)
        leases = primary.live_leases(name)
        size = lock.max_permits if lock else queue.max_permits if queue else 1
        shared = any(lease.shared for lease in leases)
        answer = pb.DescribeResponse(
            holders=[_holder(lease) for lease in leases],
            waiters=[pb.Waiter(owner=w.owner, permits=w.permits, since=_timestamp(w.since_ns),
                               give_up_time=_timestamp(w.give_up_ns), mode=_mode(w.shared))
                     for w in queue or ()],
            max_permits=size,
            available_permits=0 if shared else size - sum(lease.permits for lease in leases),
            fencing_token=primary.table.token_bound(name))
        # What it read, committed: read first, so that nothing decided while it
        # waits (and not yet committed) is in the answer.
        await group.wait_committed(group.log.last_seq)
        return answer

    @routed("name")
    async def Validate(self, request: pb.ValidateRequest, context: Ctx,
                       group: Group) -> pb.ValidateResponse:
        name = request.name
        v.check_name(name)
        # A fencing check must not rest on clocks: like a linearizable read, it
        # first commits a no-op through the replicas, which refuse a deposed
        # primary's epoch, so a primary that lost the lock's group to another
        # never calls a token valid that the new one may have ended.
        await group.barrier(slot_for(name))
        leases = _primary(group).live_leases(scoped(name))
        answer = pb.ValidateResponse(
            valid=any(lease.token == request.fencing_token for lease in leases),
            current_token=max((lease.token for lease in leases), default=0))
        await group.wait_committed(group.log.last_seq)  # what it read, committed
        return answer


class Decision(Generic[Answer]):
    """A batch's request decided here: the ``seq`` of its command, its answer once
    that is committed, and what to undo if the caller goes away first."""

    __slots__ = ("abandon", "answer", "seq")
    seq: int
    answer: Callable[[], Answer]
    abandon: Callable[[], None]

    def __init__(self, seq: int, answer: Callable[[], Answer],
                 abandon: Callable[[], None] = lambda: None) -> None:
        self.seq = seq
        self.answer = answer
        self.abandon = abandon


def _acquired(lease: Lease) -> pb.AcquireResponse:
    response = pb.AcquireResponse(lease_id=lease.lease_id, fencing_token=lease.token,
                                  expire_time=_timestamp(lease.expire_ns))
    response.ttl.FromNanoseconds(lease.ttl_ns)
    return response


def _decide_release(request: pb.ReleaseRequest, group: Group) -> int:
    """Check a Release and propose the lease's end; the command's seq."""
    v.check_name(request.name)
    v.check_lease_id(request.lease_id)
    return _primary(group).release(scoped(request.name), request.lease_id)


def _batch_error(error: MeshStatusError | ServiceError, item: str) -> pb.BatchError:
    """A batch item's error as the item's outcome; a bad field is named as the
    batch's (``requests[2].name``)."""
    field = ""
    message = error.message
    if error.code == grpc.StatusCode.INVALID_ARGUMENT:
        field = next(iter(error.violations), "") or error.metadata.get("field", "")
        if field:
            message = message.replace(f"{field}:", f"{item}.{field}:", 1)
            field = f"{item}.{field}"
    return pb.BatchError(code=error.code.value[0], reason=str(error.reason), message=message,
                         field=field)


def _holder(lease: Lease) -> pb.Holder:
    return pb.Holder(lease_id=lease.lease_id, owner=lease.owner, fencing_token=lease.token,
                     expire_time=_timestamp(lease.expire_ns), permits=lease.permits,
                     acquire_time=_timestamp(lease.acquire_ns), mode=_mode(lease.shared))


def _mode(shared: bool) -> pb.LockMode.ValueType:
    return pb.LOCK_MODE_SHARED if shared else pb.LOCK_MODE_EXCLUSIVE
