"""The pieces of the worker pool that are pure logic: what a handler gets and may
raise, the concurrency slots the claim loops share, each job's lease clock, and
how handlers are run."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import threading
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from clients.errors import LeaseLostError, MeshError
from clients.job_types import ClaimedJob, FailResult, Payload
from clients.lease import margin

ERROR_LIMIT = 4000
"""Characters of an error sent with Fail (the node keeps 4 KiB)."""


class PermanentJobError(Exception):
    """Raise from a handler to fail the job for good: it goes to the dead letters
    at once, whatever attempts it has left (e.g. a payload that can never work)."""


class RetryJobLater(Exception):
    """Raise from a handler to fail this attempt and retry after ``delay`` seconds
    instead of the job's backoff (e.g. a rate limit's Retry-After)."""

    def __init__(self, delay: float, message: str = "") -> None:
        super().__init__(message or f"retry in {delay}s")
        self.delay = delay


class JobContext:
    """What a handler receives: the claimed ``job`` and the state of its lease.

    ``lost`` turns True (and ``check()`` raises LeaseLostError) once the lease is
    known or presumed lost: the job belongs to another worker now, and nothing
    this handler does will be recorded. ``stopping`` turns True when the worker
    shuts down. Both are safe to read from a sync handler's thread; an async
    handler is simply cancelled when its lease is lost.
    """

    def __init__(self, job: ClaimedJob) -> None:
        self.job = job
        self._lost: str | None = None
        self._stopping = threading.Event()
        self.returning = False
        """Set by the worker: the job is being handed back at shutdown."""
        self.work: asyncio.Future[Any] | None = None
        """The handler's run (set by the worker)."""
        self.origin: object = None
        """The worker's claim loop that leased the job (set by the worker)."""
        self.slot_passed = False
        """Set by the worker: the job's slot went to the next job its report leased."""

    @property
    def id(self) -> str:
        return self.job.job_id

    @property
    def type(self) -> str:
        return self.job.type

    @property
    def queue(self) -> str:
        return self.job.queue

    @property
    def payload(self) -> bytes:
        return self.job.payload

    @property
    def attempt(self) -> int:
        return self.job.attempt

    @property
    def lease_token(self) -> int:
        """The fencing token: pass it to what the job writes to."""
        return self.job.lease_token

    def json(self) -> Any:
        """The payload decoded as JSON."""
        return json.loads(self.job.payload)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def lost_reason(self) -> str | None:
        return self._lost

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def check(self) -> None:
        """Raise LeaseLostError if the lease is lost."""
        if self._lost is not None:
            raise LeaseLostError(f"job {self.id}: {self._lost}",
                                 code=grpc.StatusCode.FAILED_PRECONDITION, reason="LEASE_LOST")

    def mark_stopping(self) -> None:
        self._stopping.set()

    def lose(self, reason: str) -> bool:
        """Mark the lease lost; False if it already was."""
        if self._lost is not None:
            return False
        self._lost = reason
        return True


Handler = Callable[[JobContext], Awaitable[Payload | None]] | Callable[[JobContext], Payload | None]
"""A job handler: an async function (run on the loop) or a plain one (run in a
thread of its own). Its return value is the job's result: bytes, str, a
mapping or list (JSON), or None."""


def describe_error(error: BaseException) -> str:
    """``Type: message`` and the traceback's end, within ``ERROR_LIMIT``."""
    head = f"{type(error).__name__}: {error}"
    trace = "".join(traceback.format_exception(error))
    room = ERROR_LIMIT - len(head) - 2
    if room <= 0:
        return head[:ERROR_LIMIT]
    return f"{head}\n\n{trace[-room:]}"


class Slots:
    """The pool's concurrency, shared by its claim loops. A loop reserves slots
    before it claims (so it never leases more jobs than it can run), gives back
    what the claim did not fill, and each job gives back its slot when done.
    Waiters are served in arrival order."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._changed = asyncio.Condition()

    async def reserve(self, most: int, stop: Callable[[], bool] = lambda: False) -> int:
        """Take 1 to ``most`` free slots, waiting for one; 0 once ``stop()`` holds."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.free > 0 or stop())
            if stop():
                return 0
            taken = min(most, self.free)
            self.free -= taken
            return taken

    def release(self, count: int) -> None:
        if count <= 0:
            return
        self.free = min(self.total, self.free + count)
        self.wake()

    def wake(self) -> None:
        """Let waiters look again (at ``stop()`` too)."""

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    @property
    def busy(self) -> int:
        return self.total - self.free


def loop_share(concurrency: int, loops: int) -> int:
    """Slots one claim loop may reserve at once. With ``concurrency // loops``, the
    slots held idle by loops long-polling empty queues never add up to all of
    them while at least one loop per slot exists, so no loop starves behind them."""
    return max(1, concurrency // max(1, loops))


@dataclass(slots=True)
class LeaseClock:
    """A job's lease on the local clock (``time.monotonic``).

    The node starts the lease when it leases the job, after the Claim was sent,
    and restarts it on each Heartbeat it receives; so ``renewed`` (the send time
    of the last call that granted or extended it) plus the lease length, less a
    margin, is a time by which the lease is surely still ours.
    """

    lease: float
    interval: float
    renewed: float

    @classmethod
    def for_job(cls, lease: float, sent: float, interval: float | None = None) -> LeaseClock:
        return cls(lease, interval if interval else lease / 3, sent)

    @property
    def deadline(self) -> float:
        """After this, without a newer heartbeat, the lease must be presumed lost."""
        return self.renewed + self.lease - margin(self.lease)

    def next_beat(self) -> float:
        """When to send the next heartbeat (maybe already past: a claim that
        long-polled was sent long before its job was leased)."""
        return self.renewed + self.interval

    def retry_at(self, now: float) -> float:
        """When to try again after a heartbeat that did not get through."""
        return min(now + min(1.0, self.interval / 3), max(now, self.deadline))

    def renew(self, sent: float) -> None:
        self.renewed = max(self.renewed, sent)


class Scheduler(Protocol):
    """The calls a worker makes (``SchedulerClient``; a fake in tests)."""

    async def heartbeat_many(self, leases: Sequence[tuple[str, int]], *,
                             extend: float | None = None, timeout: float | None = None
                             ) -> list[float | MeshError | None]: ...

    async def complete_and_claim(
        self, job_id: str, lease_token: int, result: Payload | None = None, *,
        queues: Sequence[str], worker_id: str, max_jobs: int = 1, lease: float = 30.0,
        timeout: float | None = None,
    ) -> tuple[float | None, list[ClaimedJob]]: ...

    async def fail_and_claim(
        self, job_id: str, lease_token: int, error: str | BaseException, *,
        queues: Sequence[str], worker_id: str, max_jobs: int = 1, lease: float = 30.0,
        retryable: bool = True, retry_delay: float | None = None,
        timeout: float | None = None,
    ) -> tuple[FailResult, list[ClaimedJob]]: ...

    def owners(self, queues: Sequence[str]) -> list[list[str]]: ...

    async def claim_at(self, queues: Sequence[str], *, worker_id: str, max_jobs: int = 1,
                       lease: float = 30.0, wait: float = 0.0,
                       timeout: float | None = None) -> list[ClaimedJob]: ...

    async def heartbeat(self, job_id: str, lease_token: int, *, extend: float | None = None,
                        timeout: float | None = None) -> float | None: ...

    async def complete(self, job_id: str, lease_token: int, result: Payload | None = None, *,
                       timeout: float | None = None) -> float | None: ...

    async def fail(self, job_id: str, lease_token: int, error: str | BaseException, *,
                   retryable: bool = True, retry_delay: float | None = None,
                   timeout: float | None = None) -> FailResult: ...


BEAT_WINDOW = 0.02
"""Seconds a heartbeat waits for others to go with it in one HeartbeatBatch."""
BEAT_GRID = 0.5
"""Heartbeats are due on a grid of this many seconds at most (a quarter of the
interval when that is less), so that those of jobs started apart still meet."""


def aligned(due: float, interval: float) -> float:
    """``due`` moved later to the heartbeat grid."""
    grid = min(BEAT_GRID, interval / 4)
    return math.ceil(due / grid) * grid if grid > 0 else due


class Beats:
    """The heartbeats of a pool's jobs, sent together: a beat waits up to
    ``window`` for others, then they all go in one ``heartbeat_many`` (one
    HeartbeatBatch per node). Each caller gets its own job's answer: a lost
    lease is that job's alone."""

    def __init__(self, scheduler: Scheduler, window: float = BEAT_WINDOW) -> None:
        self._scheduler = scheduler
        self._window = window
        self._pending: dict[str, tuple[int, asyncio.Future[float | None]]] = {}
        self._timeout: float | None = None
        self._flush: asyncio.TimerHandle | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}

    async def beat(self, job_id: str, lease_token: int, timeout: float) -> float | None:
        """Extend one lease; raises what a Heartbeat would (LeaseLostError, ...)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float | None] = loop.create_future()
        self._pending[job_id] = (lease_token, future)
        self._timeout = timeout if self._timeout is None else min(self._timeout, timeout)
        if self._flush is None:
            self._flush = loop.call_later(self._window, self._send)
        return await future

    def _send(self) -> None:
        self._flush = None
        batch = {j: tf for j, tf in self._pending.items() if not tf[1].done()}
        self._pending, timeout, self._timeout = {}, self._timeout, None
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch, timeout))
        for job_id in batch:
            self._inflight[job_id] = task

        def done(_: asyncio.Task[None]) -> None:
            for job_id in batch:
                if self._inflight.get(job_id) is task:
                    del self._inflight[job_id]

        task.add_done_callback(done)

    async def _run(self, batch: dict[str, tuple[int, asyncio.Future[float | None]]],
                   timeout: float | None) -> None:
        results: Sequence[float | BaseException | None]
        try:
            results = await self._scheduler.heartbeat_many(
                [(job_id, token) for job_id, (token, _) in batch.items()], timeout=timeout)
        except MeshError as exc:
            results = [exc] * len(batch)
        for (_, future), result in zip(batch.values(), results, strict=True):
            if future.done():
                continue  # its job ended meanwhile
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def settled(self, job_id: str) -> None:
        """Until no heartbeat of ``job_id`` is waiting or on its way: a Complete or
        Fail must not race one (answered after it, it would read as a loss)."""
        waiting = self._pending.pop(job_id, None)
        if waiting is not None:
            waiting[1].cancel()
        task = self._inflight.get(job_id)
        if task is not None:
            await asyncio.wait([task])


@dataclass(slots=True)
class WorkerStats:
    """What the pool did so far."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    """Attempts failed (by the handler, or for want of one)."""
    lost: int = 0
    """Jobs whose lease was lost while they ran."""
    returned: int = 0
    """Jobs handed back at shutdown."""


def is_async(handler: Handler) -> bool:
    """An async function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None))  # noqa: B004 - async callable objects


def in_thread(handler: Handler, ctx: JobContext) -> asyncio.Future[Any]:
    """Run a plain handler in a daemon thread (so a stuck one never holds up exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, handler(ctx))
        except BaseException as exc:
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=f"job:{ctx.id}", daemon=True).start()
    return future
