"""The gRPC face of locks: validation, routing to the name's group, commit before answering.

A lock lives in the group that owns its name's slot, and only that group's
primary serves it. Every change is answered once committed (held by every
in-sync replica): a holder never learns of a lease a failover could forget.
Describe and Validate first wait until everything the primary did so far is
committed, so they never report a decision that could still be lost.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import timestamp_pb2

from common.slots import slot_for
from common.tenancy import scoped
from mesh.lock.v1 import lock_pb2 as pb
from mesh.lock.v1 import lock_pb2_grpc as pb_grpc
from nodes.config import LockLimits
from nodes.forwarding import Forwarder
from nodes.lock import errors
from nodes.lock import validation as v
from nodes.lock.machine import LOCK, LockMachine
from nodes.lock.table import Lease, LeaseCount
from nodes.lock.waiters import Grant, Waiter
from nodes.replication.group import Group
from nodes.replication.manager import Redirect

__all__ = ["LockService"]

Ctx: TypeAlias = grpc.aio.ServicerContext

_PATH = "/mesh.lock.v1.LockService/"
_RESPONSES: dict[str, Any] = {
    "Acquire": pb.AcquireResponse, "Release": pb.ReleaseResponse,
    "Refresh": pb.RefreshResponse, "Describe": pb.DescribeResponse,
    "Validate": pb.ValidateResponse,
}
# Answer LOCK_TIMEOUT this long before the call's own deadline, so the caller
# gets a definite answer rather than DEADLINE_EXCEEDED.
_DEADLINE_MARGIN = 0.1


def _timestamp(at: float) -> timestamp_pb2.Timestamp:
    seconds = int(at)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=int((at - seconds) * 1e9))


def _machine(group: Group) -> LockMachine:
    return cast(LockMachine, group.machines[LOCK])


class LockService(pb_grpc.LockServiceServicer):
    """LockService over one `LockMachine` per replica group."""

    def __init__(self, limits: LockLimits) -> None:
        self.limits = limits
        self.leases = LeaseCount()
        self._forwarder: Forwarder | None = None

    def machine(self, group: Group) -> LockMachine:
        """The lock state machine for a group (the replication layer's factory)."""
        return LockMachine(group, self.limits, self.leases)

    def start(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder

    def _route(self, name: str, context: Ctx) -> Group | Redirect:
        assert self._forwarder is not None, "start() first"
        return self._forwarder.resolve(slot_for(name), context)

    async def _forward(self, target: Redirect, method: str, request: Any, context: Ctx) -> Any:
        assert self._forwarder is not None
        return await self._forwarder.unary(
            target, _PATH + method, request, _RESPONSES[method], context)

    # -- RPCs ------------------------------------------------------------------

    async def Acquire(self, request: pb.AcquireRequest, context: Ctx) -> pb.AcquireResponse:
        name = request.name
        v.check_name(name)
        v.check_owner(request.owner)
        v.check_request_id(request.request_id)
        ttl = v.ttl(request.ttl, self.limits, default=self.limits.default_ttl)
        assert ttl is not None
        wait = v.wait(request.wait_timeout)
        permits, max_permits = v.permits(request.permits, request.max_permits)
        shared = v.shared(request.mode, permits, max_permits)
        target = self._route(name, context)
        if isinstance(target, Redirect):
            return cast(pb.AcquireResponse,
                        await self._forward(target, "Acquire", request, context))
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, remaining - _DEADLINE_MARGIN)
        name = scoped(name)
        machine = _machine(target)
        outcome = machine.acquire(
            name, owner=request.owner, permits=permits, max_permits=max_permits, ttl=ttl,
            request_id=request.request_id, wait=wait, shared=shared)
        grant = await self._wait(machine, name, outcome, wait) \
            if isinstance(outcome, Waiter) else outcome
        try:
            await target.wait_committed(grant.seq)
        except asyncio.CancelledError:
            machine.abandon(name, grant.lease)
            raise
        lease = grant.lease
        response = pb.AcquireResponse(lease_id=lease.lease_id, fencing_token=lease.token,
                                      expire_time=_timestamp(lease.expire_at))
        response.ttl.FromNanoseconds(int(lease.ttl * 1e9))
        return response

    @staticmethod
    async def _wait(machine: LockMachine, name: str, waiter: Waiter, wait: float) -> Grant:
        """Wait in the queue; leave it on timeout or cancellation."""
        future = waiter.future
        try:
            await asyncio.wait({future}, timeout=max(wait, 0.0))
        except asyncio.CancelledError:
            machine.leave(name, waiter)
            if future.done() and not future.cancelled() and future.exception() is None:
                machine.abandon(name, future.result().lease)
            raise
        if not future.done():
            machine.leave(name, waiter)
            raise errors.lock_timeout(name, machine.table.token_bound(name),
                                      len(machine.queues.get(name) or ()))
        return future.result()

    async def Release(self, request: pb.ReleaseRequest, context: Ctx) -> pb.ReleaseResponse:
        v.check_name(request.name)
        v.check_lease_id(request.lease_id)
        target = self._route(request.name, context)
        if isinstance(target, Redirect):
            return cast(pb.ReleaseResponse,
                        await self._forward(target, "Release", request, context))
        seq = _machine(target).release(scoped(request.name), request.lease_id)
        await target.wait_committed(seq)
        return pb.ReleaseResponse()

    async def Refresh(self, request: pb.RefreshRequest, context: Ctx) -> pb.RefreshResponse:
        v.check_name(request.name)
        v.check_lease_id(request.lease_id)
        ttl = v.ttl(request.ttl, self.limits, default=None)
        target = self._route(request.name, context)
        if isinstance(target, Redirect):
            return cast(pb.RefreshResponse,
                        await self._forward(target, "Refresh", request, context))
        lease, seq = _machine(target).refresh(scoped(request.name), request.lease_id, ttl)
        await target.wait_committed(seq)
        return pb.RefreshResponse(expire_time=_timestamp(lease.expire_at),
                                  fencing_token=lease.token)

    async def Describe(self, request: pb.DescribeRequest, context: Ctx) -> pb.DescribeResponse:
        name = request.name
        v.check_name(name)
        target = self._route(name, context)
        if isinstance(target, Redirect):
            return cast(pb.DescribeResponse,
                        await self._forward(target, "Describe", request, context))
        await target.wait_committed(target.log.last_seq)
        name = scoped(name)
        machine = _machine(target)
        lock = machine.table.get(name)
        queue = machine.queues.get(name)
        leases = machine.live_leases(name)
        size = lock.max_permits if lock else queue.max_permits if queue else 1
        shared = any(lease.shared for lease in leases)
        return pb.DescribeResponse(
            holders=[_holder(lease) for lease in leases],
            waiters=[pb.Waiter(owner=w.owner, permits=w.permits, since=_timestamp(w.since),
                               give_up_time=_timestamp(w.give_up_at), mode=_mode(w.shared))
                     for w in queue or ()],
            max_permits=size,
            available_permits=0 if shared else size - sum(lease.permits for lease in leases),
            fencing_token=machine.table.token_bound(name))

    async def Validate(self, request: pb.ValidateRequest, context: Ctx) -> pb.ValidateResponse:
        name = request.name
        v.check_name(name)
        target = self._route(name, context)
        if isinstance(target, Redirect):
            return cast(pb.ValidateResponse,
                        await self._forward(target, "Validate", request, context))
        await target.wait_committed(target.log.last_seq)
        leases = _machine(target).live_leases(scoped(name))
        return pb.ValidateResponse(
            valid=any(lease.token == request.fencing_token for lease in leases),
            current_token=max((lease.token for lease in leases), default=0))


def _holder(lease: Lease) -> pb.Holder:
    return pb.Holder(lease_id=lease.lease_id, owner=lease.owner, fencing_token=lease.token,
                     expire_time=_timestamp(lease.expire_at), permits=lease.permits,
                     acquire_time=_timestamp(lease.acquire_at), mode=_mode(lease.shared))


def _mode(shared: bool) -> pb.LockMode.ValueType:
    return pb.LOCK_MODE_SHARED if shared else pb.LOCK_MODE_EXCLUSIVE
