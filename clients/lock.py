"""Typed lock calls: ``async with mesh.lock("orders", ttl=10) as lease: ...``.

A lock name routes like a cache key (its slot's primary holds the lock). Every
call is safe to retry after an unknown outcome: Acquire carries a request id,
so a retry gets back the lease an earlier try was granted; Refresh and Describe
change nothing twice; a Release that finds the lease gone after a retry had
already succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2

from clients.coalesce import BatchFailed, Coalescer
from clients.durations import duration, seconds
from clients.errors import (
    InvalidArgumentError,
    LockLostError,
    LockNotHeldError,
    LockTimeoutError,
    MeshError,
    NoNodesError,
    from_batch_error,
)
from clients.lease import Lease, LostCallback, keep_alive
from clients.requests import build
from clients.retry import Verdict, classify, with_retries
from common.tasks import cancel
from mesh.lock.v1 import lock_pb2 as pb
from mesh.lock.v1 import lock_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh

log = logging.getLogger(__name__)

FOREVER = 3600.0
"""The wait_timeout of each round of an acquire() that waits as long as it takes."""


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """A live lease of a lock (times: Unix seconds, the primary's clock)."""

    lease_id: str
    owner: str
    fencing_token: int
    permits: int
    expire_time: float
    acquire_time: float
    shared: bool = False
    """A read (shared) lease."""


@dataclass(frozen=True, slots=True)
class WaiterInfo:
    """A queued Acquire (times: Unix seconds, the primary's clock)."""

    owner: str
    permits: int
    since: float
    give_up_time: float
    shared: bool = False
    """Waiting for a read (shared) lease."""


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A snapshot of one lock: holders oldest first, waiters in serving order."""

    name: str
    holders: list[HolderInfo]
    waiters: list[WaiterInfo]
    max_permits: int
    available_permits: int
    fencing_token: int


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


_owner: tuple[int, str] = (0, "")


def default_owner() -> str:
    """``host:pid``, the owner shown by Describe when none is given."""
    global _owner
    pid = os.getpid()
    if _owner[0] != pid:  # asked once per process (a forked child asks again)
        _owner = (pid, f"{socket.gethostname()[:200]}:{pid}")
    return _owner[1]


def _request_id() -> str:
    """128 random bits in hex, as ``uuid4().hex`` without making a UUID on every acquire."""
    return os.urandom(16).hex()


def _not_held(lease: Lease, what: str) -> LockNotHeldError:
    return LockNotHeldError(f"lease {lease.lease_id} of lock {lease.name!r} {what}",
                            code=grpc.StatusCode.FAILED_PRECONDITION, reason="LOCK_NOT_HELD")


_BATCH = 256
"""Requests per AcquireBatch / ReleaseBatch call at most."""


class _Alone:
    """A coalesced request's outcome when it must be made as a call of its own:
    it was alone in its turn, or its batch answered it with an error (``error``,
    for a release whose outcome it leaves unknown)."""

    __slots__ = ("error",)

    def __init__(self, error: MeshError | None = None) -> None:
        self.error = error


_ALONE = _Alone()


class LockClient:
    """Locks and semaphores, spread over the mesh's nodes. Every call takes ``timeout=``.

    ``coalesce`` (the mesh's setting): acquires and releases made in one loop turn
    for locks led by one node travel as one AcquireBatch / ReleaseBatch call
    (``clients.coalesce``). A batch tries each acquire once, without waiting; one
    that does not get its lease that way (the lock is taken, the map moved, the
    batch failed) goes on as the call of its own it always was, with the same
    request id, so a grant the batch made but could not report is found again.
    """

    def __init__(self, mesh: Mesh, *, coalesce: bool = True) -> None:
        self._mesh = mesh
        self.coalesce = coalesce
        self._acquires: Coalescer[pb.AcquireRequest, pb.AcquireResponse | _Alone] = Coalescer(
            self._alone, self._acquire_many, _BATCH)
        self._releases: Coalescer[pb.ReleaseRequest, _Alone | None] = Coalescer(
            self._alone, self._release_many, _BATCH)

    # -- coalescing ------------------------------------------------------------

    def _owner(self, name: str) -> str | None:
        """The address of ``name``'s owner if the map names one (else None: the call
        goes alone, through the path that waits for the cluster)."""
        if not self.coalesce:
            return None
        try:
            target = self._mesh.route("lock", name)
        except NoNodesError:
            return None
        return target.address if target.owner else None

    @staticmethod
    async def _alone(address: str, request: Any, budget: float) -> _Alone:
        return _ALONE  # nothing sent: the caller makes its ordinary call

    async def _acquire_many(self, address: str, requests: list[pb.AcquireRequest],
                            budget: float) -> list[pb.AcquireResponse | _Alone]:
        r = await self._rpc(address, "AcquireBatch",
                            pb.AcquireBatchRequest(requests=requests), budget)
        return [o.granted if o.HasField("granted") else _Alone(self._error(o.error, address))
                for o in r.outcomes]

    async def _release_many(self, address: str, requests: list[pb.ReleaseRequest],
                            budget: float) -> list[_Alone | None]:
        r = await self._rpc(address, "ReleaseBatch",
                            pb.ReleaseBatchRequest(requests=requests), budget)
        return [_Alone(self._error(o.error, address)) if o.HasField("error") else None
                for o in r.outcomes]

    @staticmethod
    def _error(error: pb.BatchError, address: str) -> MeshError:
        return from_batch_error(error.code, error.reason, error.message, address)

    async def _batched(self, coalescer: Coalescer[Any, Any], address: str, request: Any,
                       budget: float) -> Any:
        """``request``'s outcome from a batch call; `_Alone` (with the batch's error
        if it failed as a whole) if it must go alone."""
        try:
            return await coalescer.call(address, request, budget)
        except BatchFailed as failed:
            return _Alone(failed.cause)

    async def _rpc(self, address: str, method: str, request: Any, budget: float) -> Any:
        return await self._mesh.call(pb_grpc.LockServiceStub, address, method, request, budget)

    async def _call(self, name: str, method: str, request: Any, timeout: float | None) -> Any:
        """One unary call to the primary of ``name``'s slot, retried (every lock call is
        safe to repeat)."""

        async def attempt(budget: float, address: str | None) -> Any:
            address = address or self._mesh.route("lock", name).address
            return await self._rpc(address, method, request, budget)

        return await with_retries(self._mesh, attempt, timeout=timeout, safe=True)

    # -- acquire -------------------------------------------------------------

    async def acquire(
        self, name: str, *, ttl: float | None = None, wait: float | None = None,
        permits: int = 1, max_permits: int = 1, shared: bool = False, owner: str = "",
        timeout: float | None = None,
    ) -> Lease:
        """Take ``permits`` of the lock ``name`` (a semaphore of ``max_permits``).

        ``wait``: None (or ``math.inf``) waits as long as it takes, 0 tries once,
        otherwise up to ``wait`` seconds, then LockTimeoutError. ``ttl``: None
        takes the node's default. ``shared``: a read lease of a plain lock, held
        alongside other readers but never a writer. ``timeout`` bounds each call
        apart from its waiting.
        """
        if wait == math.inf:
            wait = None
        if wait is not None:
            wait = seconds(wait, "wait_timeout")
            if wait < 0:
                raise InvalidArgumentError.of_field("wait_timeout", "must not be negative")
        if ttl is not None:
            ttl = seconds(ttl, "ttl")
        budget = self._mesh.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        give_up = None if wait is None else loop.time() + wait
        request = build(pb.AcquireRequest)(
            name=name, owner=owner or default_owner(), ttl=duration(ttl, "ttl") if ttl else None,
            permits=permits, max_permits=max_permits,
            mode=pb.LOCK_MODE_SHARED if shared else pb.LOCK_MODE_UNSPECIFIED)
        # One id for every try of this grant: a retry after an unknown outcome
        # (a batch's included) gets back the lease an earlier try may have been given.
        request.request_id = _request_id()
        if (address := self._owner(name)) is not None:
            sent = time.monotonic()
            granted = await self._batched(self._acquires, address, request, budget)
            if isinstance(granted, pb.AcquireResponse):
                lease = await self._confirm(request, granted, sent, ttl, budget)
                if lease is not None:
                    return lease
                request.request_id = _request_id()  # that grant is gone: a new one
            elif wait == 0 and isinstance(granted.error, LockTimeoutError):
                raise granted.error  # a try-lock: the batch's answer is the answer
        first = True
        while True:
            if not first:
                request.request_id = _request_id()
            first = False
            sent = time.monotonic()
            while True:
                round_wait = FOREVER if give_up is None else max(0.0, give_up - loop.time())
                try:
                    granted = await self._acquire_round(request, round_wait, budget)
                    break
                except LockTimeoutError:
                    if give_up is not None:
                        raise
            lease = await self._confirm(request, granted, sent, ttl, budget)
            if lease is not None:
                return lease
            if give_up is not None and loop.time() >= give_up:
                raise LockTimeoutError(
                    f"lock {name!r}: the lease granted expired before its grant could be "
                    "confirmed", code=grpc.StatusCode.ABORTED, reason="LOCK_TIMEOUT")

    async def _acquire_round(
        self, request: pb.AcquireRequest, wait: float, budget: float
    ) -> pb.AcquireResponse:
        """Acquire calls that wait up to ``wait`` seconds in all. A retry (the node
        failed over, dropping its queue) waits only for what is left."""
        loop = asyncio.get_running_loop()
        wait_end = loop.time() + wait

        async def attempt(left: float, address: str | None) -> pb.AcquireResponse:
            address = address or self._mesh.route("lock", request.name).address
            # The deadline (left) stays `budget` longer than the wait: the node
            # answers LOCK_TIMEOUT just before the deadline, not after it.
            request.wait_timeout.CopyFrom(
                duration(max(0.0, wait_end - loop.time()), "wait_timeout"))
            response: pb.AcquireResponse = await self._rpc(address, "Acquire", request, left)
            return response

        return await with_retries(self._mesh, attempt, timeout=wait + budget, safe=True)

    async def _confirm(
        self, request: pb.AcquireRequest, granted: pb.AcquireResponse, sent: float,
        ttl: float | None, budget: float,
    ) -> Lease | None:
        """The lease for a grant whose first request was sent at ``sent``; None if
        the grant is already gone."""
        name, lease_id = request.name, granted.lease_id
        expire_time = _seconds(granted.expire_time)
        lease_ttl = ttl or granted.ttl.ToNanoseconds() / 1e9
        if time.monotonic() - sent > lease_ttl / 3:
            # The call waited in the queue or was retried: the grant may date
            # from its first send and most of its ttl be gone. A refresh starts
            # the local clock again (and tells whether the lease is still there).
            try:
                sent, refreshed = await self._refresh(name, lease_id, None, budget)
            except LockNotHeldError:
                return None
            except BaseException:
                with contextlib.suppress(MeshError):
                    await self._call(name, "Release",
                                     pb.ReleaseRequest(name=name, lease_id=lease_id), budget)
                raise
            expire_time = _seconds(refreshed.expire_time)
        return Lease(self, name, lease_id, granted.fencing_token, lease_ttl,
                     request.permits or 1, expire_time, sent)

    async def try_acquire(
        self, name: str, *, ttl: float | None = None, permits: int = 1, max_permits: int = 1,
        shared: bool = False, owner: str = "", timeout: float | None = None,
    ) -> Lease | None:
        """The lease if the permits are free right now, else None."""
        try:
            return await self.acquire(name, ttl=ttl, wait=0, permits=permits,
                                      max_permits=max_permits, shared=shared, owner=owner,
                                      timeout=timeout)
        except LockTimeoutError:
            return None

    # -- leases ----------------------------------------------------------------

    async def _refresh(
        self, name: str, lease_id: str, ttl: float | None, timeout: float | None
    ) -> tuple[float, pb.RefreshResponse]:
        """Refresh, with the send time of the try that succeeded."""
        sent = 0.0
        request = pb.RefreshRequest(name=name, lease_id=lease_id,
                                    ttl=duration(ttl, "ttl") if ttl else None)

        async def attempt(budget: float, address: str | None) -> pb.RefreshResponse:
            nonlocal sent
            address = address or self._mesh.route("lock", name).address
            sent = time.monotonic()
            response: pb.RefreshResponse = await self._rpc(address, "Refresh", request, budget)
            return response

        response = await with_retries(self._mesh, attempt, timeout=timeout, safe=True)
        return sent, response

    async def refresh(
        self, lease: Lease, ttl: float | None = None, *, timeout: float | None = None
    ) -> None:
        """Extend ``lease`` by ``ttl`` (default: its current ttl) from now.

        LockNotHeldError, and the lease marked lost, if the node no longer has it;
        LockLostError if it is already lost or its local deadline passed meanwhile.
        """
        if lease.released:
            raise _not_held(lease, "was released")
        lease.check()
        try:
            sent, r = await self._refresh(lease.name, lease.lease_id, ttl, timeout)
        except LockNotHeldError as exc:
            lease._lose(f"the node no longer has it ({exc.message})")
            raise
        lease._renewed(sent, ttl or lease.ttl, _seconds(r.expire_time))
        lease.check()

    async def release(self, lease: Lease, *, timeout: float | None = None) -> None:
        """Give ``lease`` back; nothing happens if it was released already.

        LockNotHeldError, and the lease marked lost, if the node had already
        dropped it (expired) while it was not yet known to be lost.
        """
        if lease.released:
            return
        request = pb.ReleaseRequest(name=lease.name, lease_id=lease.lease_id)
        if (address := self._owner(lease.name)) is not None:
            budget = self._mesh.timeout if timeout is None else timeout
            outcome = await self._batched(self._releases, address, request, budget)
            if outcome is None:
                lease._mark_released()
                return
            if outcome.error is not None and classify(outcome.error) is Verdict.UNKNOWN:
                lease._release_sent = True  # it may have been released: see below

        async def attempt(budget: float, address: str | None) -> None:
            address = address or self._mesh.route("lock", lease.name).address
            try:
                await self._rpc(address, "Release", request, budget)
            except MeshError as exc:
                if classify(exc) is Verdict.UNKNOWN:
                    lease._release_sent = True
                raise

        try:
            await with_retries(self._mesh, attempt, timeout=timeout, safe=True)
        except LockNotHeldError as exc:
            # Gone already: released by an earlier try, or expired. Only a loss
            # nobody knew about yet is worth an error.
            if not lease._release_sent and not lease._expired():
                lease._lose(f"the node no longer had it at release ({exc.message})")
                lease._mark_released()
                raise
        lease._mark_released()

    # -- inspection ------------------------------------------------------------

    async def describe(self, name: str, *, timeout: float | None = None) -> LockInfo:
        """The lock's holders, waiters and latest fencing token (an unused lock has none)."""
        r = await self._call(name, "Describe", pb.DescribeRequest(name=name), timeout)
        holders = [HolderInfo(h.lease_id, h.owner, h.fencing_token, h.permits,
                              _seconds(h.expire_time), _seconds(h.acquire_time),
                              h.mode == pb.LOCK_MODE_SHARED)
                   for h in r.holders]
        waiters = [WaiterInfo(w.owner, w.permits, _seconds(w.since), _seconds(w.give_up_time),
                              w.mode == pb.LOCK_MODE_SHARED)
                   for w in r.waiters]
        return LockInfo(name, holders, waiters, r.max_permits, r.available_permits,
                        r.fencing_token)

    async def validate(self, name: str, token: int, *, timeout: float | None = None) -> bool:
        """True if ``token`` belongs to a live lease of ``name``: linearizable (the
        primary commits a no-op through its replicas first, so a deposed one
        never answers)."""
        request = build(pb.ValidateRequest)(name=name, fencing_token=token)
        r = await self._call(name, "Validate", request, timeout)
        return bool(r.valid)

    # -- holding ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(
        self, name: str, *, ttl: float = 30.0, wait: float | None = None, permits: int = 1,
        max_permits: int = 1, shared: bool = False, owner: str = "",
        on_lost: LostCallback | None = None, timeout: float | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold ``name`` for the ``async with`` block, refreshing every ttl/3.

        ``lease.lost`` is set (and ``on_lost(lease)`` called) the moment the lease
        is lost. Exiting releases it; if it was lost meanwhile and the block did
        not raise, exiting raises LockLostError: the block may have run unprotected.
        """
        lease = await self.acquire(name, ttl=ttl, wait=wait, permits=permits,
                                   max_permits=max_permits, shared=shared, owner=owner,
                                   timeout=timeout)
        if on_lost is not None:
            lease.on_lost(on_lost)
        refresher = asyncio.get_running_loop().create_task(
            keep_alive(lease), name=f"lock-refresh:{name}")
        try:
            yield lease
        finally:
            with contextlib.suppress(Exception):
                await cancel(refresher)  # again until it ends: a refresh may swallow one
            lost = lease._expired()
            try:
                await self.release(lease, timeout=timeout)
            except LockNotHeldError:
                lost = True
            except MeshError as exc:
                log.warning("could not release lock %r (it expires after its ttl): %s",
                            name, exc)
        if lost:
            raise LockLostError(f"lock {name!r} was lost while held: {lease.lost_reason}")
