"""The worker pool: claims jobs in batches and runs their handlers, ``concurrency`` at a time.

    worker = Worker(mesh, ["mail", "reports"], {"email.send": send, "report": build},
                    concurrency=8)
    await worker.run()          # until SIGTERM / SIGINT, then a graceful stop

Claiming: the queues are split by the node that leads them (one Claim names
queues of one node) and each group gets a claim loop; the loops share the
pool's slots and reserve them before claiming, so no job is leased that cannot
start at once. A Claim long-polls (``poll`` seconds). The split is checked
again every second and the loops are replaced when the map moved a queue.

Running: an async handler runs on the loop, a plain one in a thread of its
own. While it runs its lease is extended every ``heartbeat`` seconds (default
lease/3); the heartbeats of all running jobs that fall due together go in one
HeartbeatBatch per node (``Beats``), each job getting its own answer. It
succeeds by returning (Complete with the result); raising PermanentJobError
fails the job for good, RetryJobLater retries it after a given delay, any
other exception fails the attempt retryably (the job's backoff applies). A
job of a type with no handler fails retryably: another worker may know it.
With ``chain`` (the default), the Complete or Fail of a job also leases the
next job ready in the queues it came from (``ClaimNext``),
which then runs in the finished job's slot: a busy pool needs no Claim call
between jobs, while its claim loops keep long-polling for the other slots.

Lease loss: when a heartbeat, Complete or Fail is refused with LEASE_LOST (the
lease expired, the job was cancelled or claimed again), or no heartbeat got
through before the lease ran out on the local clock, the job belongs to
someone else: its handler is cancelled (a thread cannot be: ``JobContext.lost``
turns True and its result is dropped; its slot is freed at once), nothing more
is sent, and the loss is logged. Pass ``JobContext.lease_token`` to the
systems the job writes to so that they can reject a stale worker.

Shutdown (``stop(graceful=True)``, or SIGTERM under ``run()``): claiming stops
at once (in-flight Claims are cancelled, and the nodes put back what they had
leased for them); running jobs get ``grace`` seconds to finish. Jobs still
running then are handed back: their handlers are cancelled and each is failed
retryably with no delay, so another worker takes it at once. That spends one of
its attempts; a job on its last attempt is not failed (that would kill it) but
left to its lease, which expires without spending an attempt. A second signal,
or ``stop(graceful=False)``, skips the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from clients.errors import (
    InvalidArgumentError,
    LeaseLostError,
    MeshError,
    UnauthenticatedError,
    UnimplementedError,
)
from clients.job_runtime import (
    Beats,
    Handler,
    JobContext,
    LeaseClock,
    PermanentJobError,
    RetryJobLater,
    Scheduler,
    Slots,
    WorkerStats,
    aligned,
    describe_error,
    in_thread,
    is_async,
    loop_share,
)
from clients.job_types import ClaimedJob, JobState
from clients.retry import Backoff
from clients.scheduler import MAX_CLAIM, Regroup, default_worker_id

if TYPE_CHECKING:
    from clients.mesh import Mesh

__all__ = ["Handler", "JobContext", "PermanentJobError", "RetryJobLater", "Worker",
           "WorkerStats"]

log = logging.getLogger(__name__)

FATAL = (InvalidArgumentError, UnauthenticatedError, UnimplementedError)
"""Claim errors that no retry can fix: the worker stops and ``run()`` raises."""
REPLAN_INTERVAL = 1.0
"""Seconds between checks that the claim loops still match the queues' owners."""
DEFAULT_TIMEOUT = 5.0
"""A heartbeat's deadline when the worker has no ``timeout`` (also bounded by the lease)."""
_BACKOFF = Backoff(initial=0.1, maximum=5.0)


class _ClaimLoop:
    """One claim loop's switches: stopping it cancels its Claim in flight."""

    def __init__(self, queues: list[str]) -> None:
        self.queues = queues
        self.stopped = False
        self.claim: asyncio.Task[list[ClaimedJob]] | None = None
        self.task: asyncio.Task[None] | None = None

    def stop(self) -> None:
        self.stopped = True
        if self.claim is not None:
            self.claim.cancel()


class Worker:
    """A pool running the handlers of jobs claimed from ``queues``.

    ``handlers``: job type -> Handler. ``concurrency``: jobs run at once.
    ``batch``: most jobs per Claim (default: ``concurrency``, at most 100).
    ``lease``: lease length asked for (seconds). ``poll``: how long a Claim
    waits for jobs (at most 60). ``heartbeat``: seconds between lease
    extensions (default lease/3). ``grace``: how long a graceful stop lets
    running jobs finish. ``timeout``: each call's deadline (default the mesh's).
    ``chain``: a job's Complete or Fail also leases the next job for its slot.
    ``on_ended(ctx, succeeded)``: awaited once a job finished for good here
    (Complete accepted, or Fail answered DEAD); sagas use it to report the step.
    """

    def __init__(
        self, mesh: Mesh | Scheduler, queues: str | Sequence[str],
        handlers: Mapping[str, Handler], *,
        concurrency: int = 10, batch: int | None = None, lease: float = 30.0,
        poll: float = 20.0, heartbeat: float | None = None, grace: float = 30.0,
        worker_id: str = "", timeout: float | None = None, chain: bool = True,
        on_ended: Callable[[JobContext, bool], Awaitable[None]] | None = None,
    ) -> None:
        self.scheduler: Scheduler = cast(Scheduler, getattr(mesh, "scheduler", mesh))
        self.queues = [queues] if isinstance(queues, str) else list(dict.fromkeys(queues))
        if not self.queues or concurrency < 1:
            raise ValueError("a worker needs at least one queue and a concurrency of 1 or more")
        self.handlers = dict(handlers)
        self.concurrency = concurrency
        self.batch = max(1, min(batch or concurrency, MAX_CLAIM))
        self.lease = lease
        self.poll = min(poll, 60.0)
        self.heartbeat = heartbeat
        self.grace = grace
        self.worker_id = worker_id or default_worker_id()
        self.timeout = timeout
        self.chain = chain
        self.on_ended = on_ended
        self.stats = WorkerStats()
        self._beats = Beats(self.scheduler)
        self._slots = Slots(concurrency)
        self._loops: list[_ClaimLoop] = []
        self._jobs: dict[asyncio.Task[None], JobContext] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        self._done = asyncio.Event()
        self._error: BaseException | None = None

    # -- life cycle ------------------------------------------------------------

    async def start(self) -> Worker:
        """Start claiming in the background (not again once stopped)."""
        if self._supervisor is None and self._stopping is None:
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"worker:{self.worker_id}")
        return self

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._jobs)

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    async def stop(self, graceful: bool = True, grace: float | None = None) -> None:
        """Stop claiming; let running jobs finish for ``grace`` seconds (default the
        worker's; none unless ``graceful``), then hand the rest back. Returns once
        every job is settled. ``stop(graceful=False)`` during a graceful stop
        ends its grace period at once."""
        if not graceful:
            self._hurry.set()
        if self._stopping is None:
            wait = (self.grace if grace is None else grace) if graceful else 0.0
            self._stopping = asyncio.get_running_loop().create_task(self._shutdown(wait))
        await asyncio.shield(self._stopping)

    async def wait(self) -> None:
        """Until the worker has stopped; raises the error that stopped it, if any."""
        await self._done.wait()
        if self._error is not None:
            raise self._error

    async def run(self) -> None:
        """Start, and run until SIGTERM or SIGINT (a graceful stop; a second one
        hurries it) or a fatal error (raised here)."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here
        try:
            await self.start()
            await self.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        graceful = self._stopping is None
        log.info("worker %s: %s, stopping (%s)", self.worker_id, signal.Signals(sig).name,
                 f"grace {self.grace:g}s" if graceful else "at once")
        asyncio.get_running_loop().create_task(self.stop(graceful=graceful))

    def _fatal(self, error: BaseException) -> None:
        log.error("worker %s stops: %s", self.worker_id, error)
        if self._error is None:
            self._error = error
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._shutdown(self.grace))

    async def _shutdown(self, grace: float) -> None:
        try:
            if self._supervisor is not None:  # first: it could start new loops
                self._supervisor.cancel()
                await asyncio.gather(self._supervisor, return_exceptions=True)
            for claim_loop in self._loops:
                claim_loop.stop()
            self._slots.wake()
            await asyncio.gather(*(c.task for c in self._loops if c.task),
                                 return_exceptions=True)
            for ctx in self._jobs.values():
                ctx.mark_stopping()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            hurry = asyncio.ensure_future(self._hurry.wait())
            while self._jobs and not hurry.done() and loop.time() < deadline:
                await asyncio.wait([*self._jobs, hurry], timeout=deadline - loop.time(),
                                   return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            # Hand back what still runs; jobs already reporting finish doing so.
            for ctx in list(self._jobs.values()):
                ctx.returning = True
                if ctx.work is not None and not ctx.work.done():
                    ctx.work.cancel()
            await asyncio.gather(*self._jobs, return_exceptions=True)
        finally:
            self._done.set()

    # -- claiming --------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep one claim loop per owner of the queues, re-planned as the map moves."""
        plan: list[list[str]] = []
        try:
            while True:
                fresh = self.scheduler.owners(self.queues)
                if sorted(map(sorted, fresh)) != sorted(map(sorted, plan)) or any(
                        c.task is not None and c.task.done() for c in self._loops):
                    await self._replace_loops(fresh)
                    plan = fresh
                await asyncio.sleep(REPLAN_INTERVAL)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: better stopped than silently idle
            self._fatal(exc)

    async def _replace_loops(self, plan: list[list[str]]) -> None:
        old, self._loops = self._loops, []
        for claim_loop in old:
            claim_loop.stop()
        self._slots.wake()
        await asyncio.gather(*(c.task for c in old if c.task), return_exceptions=True)
        share = loop_share(self.concurrency, len(plan))
        # Fewer slots than loops: a loop's idle long poll must not hold a slot long.
        poll = self.poll if self.concurrency >= len(plan) else min(self.poll, 1.0)
        for queues in plan:
            claim_loop = _ClaimLoop(queues)
            claim_loop.task = asyncio.get_running_loop().create_task(
                self._claim_loop(claim_loop, min(self.batch, share), poll),
                name=f"claim:{','.join(queues)[:60]}")
            self._loops.append(claim_loop)
        log.debug("worker %s claims from %s", self.worker_id, plan)

    async def _claim_loop(self, me: _ClaimLoop, most: int, poll: float) -> None:
        failures = 0
        while not me.stopped:
            reserved = await self._slots.reserve(most, lambda: me.stopped)
            if not reserved:
                return
            sent = time.monotonic()
            me.claim = asyncio.get_running_loop().create_task(self.scheduler.claim_at(
                me.queues, worker_id=self.worker_id, max_jobs=reserved, lease=self.lease,
                wait=poll, timeout=self.timeout))
            try:
                jobs = await asyncio.shield(me.claim)
            except asyncio.CancelledError:
                claim = me.claim
                if claim.done() and not claim.cancelled() and claim.exception() is None:
                    self._start_jobs(claim.result(), reserved, sent, me)  # answered anyway
                else:
                    claim.cancel()  # its node puts back what it leased for it
                    self._slots.release(reserved)
                if me.stopped and claim.cancelled():
                    return  # stop() cancelled the claim, not this loop
                raise
            except Regroup:
                self._slots.release(reserved)
                return  # the supervisor plans again
            except FATAL as exc:
                self._slots.release(reserved)
                self._fatal(exc)
                return
            except MeshError as exc:
                self._slots.release(reserved)
                failures += 1
                log.warning("worker %s: claiming from %s failed (%s); retrying",
                            self.worker_id, me.queues, exc)
                await asyncio.sleep(_BACKOFF.delay(failures))
                continue
            finally:
                me.claim = None
            failures = 0
            self._start_jobs(jobs, reserved, sent, me)

    def _start_jobs(self, jobs: list[ClaimedJob], reserved: int, sent: float,
                    origin: _ClaimLoop) -> None:
        """Run ``jobs`` in ``reserved`` slots, giving back the ones left over."""
        self._slots.release(reserved - len(jobs))
        self.stats.claimed += len(jobs)
        for job in jobs:
            ctx = JobContext(job)
            ctx.origin = origin
            if self._stopping is not None:
                ctx.mark_stopping()  # chained in while the pool stops
            task = asyncio.get_running_loop().create_task(self._run(ctx, sent),
                                                          name=f"job:{job.job_id}")
            self._jobs[task] = ctx
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        ctx = self._jobs.pop(task, None)
        if ctx is None or not ctx.slot_passed:
            self._slots.release(1)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %s: job task failed", self.worker_id, exc_info=task.exception())

    # -- running ---------------------------------------------------------------

    async def _run(self, ctx: JobContext, sent: float) -> None:
        handler = self.handlers.get(ctx.type)
        if handler is None:
            self.stats.failed += 1
            await self._fail(ctx, f"no handler for job type {ctx.type!r} on worker "
                                  f"{self.worker_id}", retryable=True)
            return
        work: asyncio.Future[Any] = (asyncio.ensure_future(handler(ctx))  # type: ignore[arg-type]
                                     if is_async(handler) else in_thread(handler, ctx))
        ctx.work = work
        beats = asyncio.get_running_loop().create_task(self._keep_leased(ctx, work, sent))
        try:
            await asyncio.wait([work])
        except asyncio.CancelledError:
            work.cancel()  # this task itself was cancelled
            raise
        finally:
            # No heartbeat may race the report: one answered after it reads as a loss.
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            await self._beats.settled(ctx.id)
        if work.cancelled():
            if ctx.returning:
                await self._hand_back(ctx)
            return  # or the lease was lost: logged where that was found out
        error = work.exception()
        if ctx.lost:
            log.info("job %s ended after its lease was lost; its outcome is dropped", ctx.id)
        elif error is None:
            await self._finish(ctx, work.result())
        elif isinstance(error, PermanentJobError):
            self.stats.failed += 1
            await self._fail(ctx, describe_error(error), retryable=False)
        elif isinstance(error, RetryJobLater):
            self.stats.failed += 1
            await self._fail(ctx, str(error), retryable=True, retry_delay=error.delay)
        else:
            self.stats.failed += 1
            log.info("job %s (%s) attempt %d failed: %r", ctx.id, ctx.type, ctx.attempt, error)
            await self._fail(ctx, describe_error(error), retryable=True)

    async def _keep_leased(self, ctx: JobContext, work: asyncio.Future[Any],
                           sent: float) -> None:
        """Heartbeat while the handler runs; on loss, cancel it."""
        clock = LeaseClock.for_job(ctx.job.lease_duration, sent, self.heartbeat)
        due = aligned(clock.next_beat(), clock.interval)
        while not work.done():
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            budget = self.timeout if self.timeout is not None else DEFAULT_TIMEOUT
            try:
                await self._beats.beat(ctx.id, ctx.lease_token,
                                       timeout=max(0.5, min(budget, clock.deadline - now)))
            except LeaseLostError as exc:
                self._lost(ctx, work, f"the node says the lease is gone (job {exc.state or '?'})")
                return
            except MeshError as exc:
                if time.monotonic() >= clock.deadline:
                    self._lost(ctx, work, f"no heartbeat got through before the lease ran "
                                          f"out ({exc})")
                    return
                log.debug("heartbeat of job %s failed (%s); trying again", ctx.id, exc)
                due = clock.retry_at(time.monotonic())
                continue
            clock.renew(now)
            due = aligned(clock.next_beat(), clock.interval)

    def _lost(self, ctx: JobContext, work: asyncio.Future[Any] | None, why: str) -> None:
        if ctx.lose(why):
            self.stats.lost += 1
            log.warning("job %s (%s) lost its lease: %s; stopping its work", ctx.id, ctx.type,
                        why)
        if work is not None and not work.done():
            work.cancel()

    def _chained(self, ctx: JobContext) -> list[str] | None:
        """The queues to lease ``ctx``'s slot a next job from, if the pool does."""
        origin = ctx.origin
        if not self.chain or self._stopping is not None or not isinstance(origin, _ClaimLoop) \
                or origin.stopped:
            return None
        return origin.queues

    def _pass_slot(self, ctx: JobContext, jobs: list[ClaimedJob], sent: float) -> None:
        """Run the job a Complete or Fail leased in the slot ``ctx`` leaves."""
        if jobs and isinstance(ctx.origin, _ClaimLoop):
            ctx.slot_passed = True
            self._start_jobs(jobs, 1, sent, ctx.origin)

    async def _finish(self, ctx: JobContext, result: Any) -> None:
        queues = self._chained(ctx)
        try:
            if queues is None:
                await self.scheduler.complete(ctx.id, ctx.lease_token, result,
                                              timeout=self.timeout)
            else:
                sent = time.monotonic()
                _, jobs = await self.scheduler.complete_and_claim(
                    ctx.id, ctx.lease_token, result, queues=queues, worker_id=self.worker_id,
                    lease=self.lease, timeout=self.timeout)
                self._pass_slot(ctx, jobs, sent)
        except LeaseLostError as exc:
            self._lost(ctx, None, f"Complete refused (job {exc.state or '?'}); result dropped")
        except MeshError as exc:
            log.warning("job %s: Complete failed (%s); it runs again once its lease expires",
                        ctx.id, exc)
        else:
            self.stats.succeeded += 1
            await self._ended(ctx, True)

    async def _fail(self, ctx: JobContext, error: str, *, retryable: bool,
                    retry_delay: float | None = None, chain: bool = True) -> None:
        queues = self._chained(ctx) if chain else None
        try:
            if queues is None:
                failed = await self.scheduler.fail(
                    ctx.id, ctx.lease_token, error, retryable=retryable,
                    retry_delay=retry_delay, timeout=self.timeout)
            else:
                sent = time.monotonic()
                failed, jobs = await self.scheduler.fail_and_claim(
                    ctx.id, ctx.lease_token, error, queues=queues, worker_id=self.worker_id,
                    lease=self.lease, retryable=retryable, retry_delay=retry_delay,
                    timeout=self.timeout)
                self._pass_slot(ctx, jobs, sent)
        except LeaseLostError as exc:
            self._lost(ctx, None, f"Fail refused (job {exc.state or '?'})")
        except MeshError as exc:
            log.warning("job %s: Fail failed (%s); it runs again once its lease expires",
                        ctx.id, exc)
        else:
            if failed.state == JobState.DEAD:
                await self._ended(ctx, False)

    async def _ended(self, ctx: JobContext, succeeded: bool) -> None:
        """Tell ``on_ended`` that the job finished for good (its failure must not
        fail the job, which has ended)."""
        if self.on_ended is None:
            return
        try:
            await self.on_ended(ctx, succeeded)
        except Exception as exc:
            log.info("job %s: on_ended failed: %r", ctx.id, exc)

    async def _hand_back(self, ctx: JobContext) -> None:
        """Return a job still running at shutdown (see the module's docstring)."""
        if ctx.lost:
            return
        if ctx.job.last_attempt:
            log.info("job %s is on its last attempt: left to its lease, not failed", ctx.id)
            return
        self.stats.returned += 1
        await self._fail(ctx, f"worker {self.worker_id} shut down before the job finished",
                         retryable=True, retry_delay=0.0, chain=False)
