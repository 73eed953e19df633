"""What only a group's primary runs: its timers and its waiting Claim calls.

Two timers per group. One waits on the wall clock for the earliest delayed
job coming due (wake the queue's waiters) or cron tick (fire it: a replicated
decision): those are instants a user named. The other waits on the monotonic
clock for the earliest lease or attempt timeout to run out (expire it: a
replicated decision): those are durations, and a wall clock stepped forward
(NTP, an operator) must not end a lease its worker still relies on, nor a
step back keep a crashed worker's job from coming back. Each leased job's
ends are kept on this primary's monotonic clock (`Job.lease_end_mono`,
`Job.timeout_mono`), set when the command that leased or extended it is
applied here; the wall instants in the replicated state are what a reader
sees. Finished jobs past retention are removed by the service's periodic
sweep.

Nothing here is replicated state: a new primary rebuilds it all from the
group's state in `start`, and gives every running lease a full lease from its
promotion (the old primary's clock is not ours, and no lease may end early
because of a failover).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.clock import SYSTEM_CLOCK, Clock, Timer
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.config import SchedulerLimits
from nodes.scheduler import cron, errors
from nodes.scheduler.claims import ClaimWaiter, claim
from nodes.scheduler.model import (
    CANCELLED,
    LEASED,
    READY,
    REQUEST_EXPIRE_NS,
    SUCCEEDED,
    Job,
    Request,
    Schedule,
)

if TYPE_CHECKING:
    from nodes.scheduler.machine import SchedulerMachine

__all__ = ["Leader"]

log = logging.getLogger(__name__)

_DUE, _CRON = 0, 1
_SLACK_NS = 200_000
"""A wakeup this close is run now (the loop may wake a hair early)."""
_REMOVE_BATCH = 10_000
_SKIP_COUNT_LIMIT = 10_000
"""Missed cron ticks counted one by one at most; beyond, the schedule jumps ahead."""

Wakeup = tuple[int, int, int, tuple[str, ...]]
"""(wall at_ns, tie-break, kind, key)."""


class Leader:
    """The primary's side of one group's scheduler."""

    def __init__(self, machine: SchedulerMachine, limits: SchedulerLimits,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._machine = machine
        self._limits = limits
        self._clock = clock
        self._heap: list[Wakeup] = []
        self._ties = itertools.count()
        self._leases: list[tuple[int, str]] = []
        """(monotonic instant, job id): when to look at a leased job's ends."""
        self._retained: list[tuple[int, str]] = []
        self._requests: list[tuple[int, str, str]] = []
        """(expire_ns, queue, request_id) of remembered request ids."""
        self._handle: Timer | None = None
        self._armed_ns = 0
        self._lease_handle: Timer | None = None
        self._lease_armed_ns = 0
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit tests): wakeups run through run_due
            self._loop = None
        self.waiters: dict[str, dict[ClaimWaiter, None]] = {}
        self._dirty: set[str] = set()
        self._serving: asyncio.Handle | None = None
        self._crons: dict[str, cron.CronExpr] = {}
        self.stopped = False

    def start(self, now: int) -> None:
        """Take over: wakeups for every lease, delayed job and schedule."""
        state = self._machine.state
        for job in state.jobs.live():
            if job.state == LEASED:
                # A full lease from our promotion (and as long before a timeout).
                grace = now + min(job.lease_ns, job.timeout_ns)
                job.timeout_at_ns = max(job.timeout_at_ns, grace)
                job.lease_expire_ns = max(job.lease_expire_ns,
                                          min(now + job.lease_ns, job.timeout_at_ns))
                job.timer_ns = 0  # any earlier timer went with an earlier leadership
                self.leased(job, now)
        self._retained = list(state.jobs.retained())
        heapq.heapify(self._retained)
        self._requests = [(expire_ns, queue.name, request_id)
                          for queue in state.queues.values()
                          for request_id, (_, expire_ns, _) in queue.requests.items()]
        heapq.heapify(self._requests)
        for queue in state.queues.values():
            due = queue.next_due()
            if due is not None:
                self._push(due, _DUE, (queue.name,))
        for schedule in state.schedules.values():
            self.scheduled(schedule)

    def stop(self) -> None:
        """No longer the primary: cancel the timer, end waiting Claims."""
        self.stopped = True
        for handle in (self._handle, self._lease_handle, self._serving):
            if handle is not None:
                handle.cancel()
        self._handle = self._lease_handle = None
        self._heap.clear()
        self._leases.clear()
        self.end_waiters(errors.primary_lost(self._machine.group.group_id))

    def end_waiters(self, error: BaseException) -> None:
        """Answer every waiting Claim with ``error``."""
        waiters = {w for queue in self.waiters.values() for w in queue}
        self.waiters.clear()
        for waiter in waiters:
            waiter.fail(error)

    # -- hooks: the machine applied a change -------------------------------------------

    def waiting(self, job: Job) -> None:
        if job.where == READY:
            self.ready(job.queue)
        else:
            self._push(job.run_ns, _DUE, (job.queue,))

    def leased(self, job: Job, now: int) -> None:
        """``job`` was leased by a command issued at wall instant ``now`` (or this
        primary took it over at ``now``): its lease and its attempt start here."""
        mono = self._clock.monotonic_ns()
        job.timeout_mono = mono + job.timeout_at_ns - now
        self.extended(job, now, mono)

    def extended(self, job: Job, now: int, mono: int | None = None) -> None:
        """``job``'s lease was extended by a command issued at wall instant ``now``.

        The command was applied here in the turn of the loop that issued it,
        so ``lease_expire_ns - now`` is the lease it grants whatever the wall
        clock did before or does after."""
        if mono is None:
            mono = self._clock.monotonic_ns()
        job.lease_end_mono = mono + job.lease_expire_ns - now
        deadline = min(job.lease_end_mono, job.timeout_mono)
        if not job.timer_ns or deadline < job.timer_ns:
            job.timer_ns = deadline
            heapq.heappush(self._leases, (deadline, job.job_id))
            if self._lease_handle is None or deadline < self._lease_armed_ns:
                self._arm_leases(deadline)

    def ended(self, job: Job) -> bool:
        """Whether ``job``'s lease or attempt has run out (on the monotonic clock)."""
        return min(job.lease_end_mono, job.timeout_mono) <= self._clock.monotonic_ns()

    def timeout_left(self, job: Job) -> int:
        """Nanoseconds until ``job``'s running attempt times out."""
        return job.timeout_mono - self._clock.monotonic_ns()

    def finished(self, job: Job) -> None:
        if job.state in (SUCCEEDED, CANCELLED):
            heapq.heappush(self._retained, (job.finish_ns + job.retention_ns, job.job_id))

    def remembered(self, queue: str, request_id: str, request: Request) -> None:
        _, expire_ns, _ = request
        heapq.heappush(self._requests, (expire_ns, queue, request_id))

    def scheduled(self, schedule: Schedule) -> None:
        self._push(schedule.record.next_fire_ns, _CRON, schedule.key)

    def ready(self, queue: str) -> None:
        """Jobs became ready in ``queue``: serve its waiters soon (once per turn of
        the loop however many jobs came)."""
        if queue not in self.waiters:
            return
        self._dirty.add(queue)
        if self._serving is None and self._loop is not None:
            self._serving = self._loop.call_soon(self._serve)

    # -- waiters ---------------------------------------------------------------------

    def add_waiter(self, waiter: ClaimWaiter, queues: Sequence[str]) -> None:
        for queue in queues:
            self.waiters.setdefault(queue, {})[waiter] = None
        waiter.places.append((self, list(queues)))

    def remove_waiter(self, waiter: ClaimWaiter, queues: Sequence[str]) -> None:
        for queue in queues:
            found = self.waiters.get(queue)
            if found is not None:
                found.pop(waiter, None)
                if not found:
                    del self.waiters[queue]

    def _serve(self) -> None:
        self._serving = None
        dirty, self._dirty = self._dirty, set()
        if self.stopped or not self._machine.group.writable:
            return
        state = self._machine.state
        now = self._clock.wall_ns()
        for name in dirty:
            for waiter in list(self.waiters.get(name, ())):
                if waiter.done:
                    waiter.leave()
                    continue
                sources = [(self._machine, queue) for leader, names in waiter.places
                           if leader is self for name in names
                           if (queue := state.queues.get(name)) is not None]
                claimed = claim(sources, waiter.worker_id, waiter.max_jobs, waiter.lease_ns,
                                now, waiter.room)
                if not claimed:
                    break  # nothing ready any more in this queue
                waiter.grant(claimed)

    # -- timers ------------------------------------------------------------------------

    def _push(self, at_ns: int, kind: int, key: tuple[str, ...]) -> None:
        heapq.heappush(self._heap, (at_ns, next(self._ties), kind, key))
        if self._handle is None or at_ns < self._armed_ns:
            self._arm(at_ns)

    def _arm(self, at_ns: int) -> None:
        if self._loop is None or self.stopped:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._clock.call_at(at_ns, self._fire)
        self._armed_ns = at_ns

    def _arm_leases(self, at_mono: int) -> None:
        if self._loop is None or self.stopped:
            return
        if self._lease_handle is not None:
            self._lease_handle.cancel()
        self._lease_handle = self._clock.call_after(
            at_mono - self._clock.monotonic_ns(), self._fire_leases)
        self._lease_armed_ns = at_mono

    def _fire(self) -> None:
        self._handle = None
        self._ring()

    def _fire_leases(self) -> None:
        self._lease_handle = None
        self._ring()

    def _ring(self) -> None:
        """A timer went off: run what is due, then set each timer that is not set
        for what is left."""
        try:
            self.run_due()
        except Exception:  # a bug must not stop the group's timers for good
            log.exception("group %d: scheduler timers failed", self._machine.group.group_id)
        if self._heap and self._handle is None:
            self._arm(self._heap[0][0])
        if self._leases and self._lease_handle is None:
            self._arm_leases(self._leases[0][0])

    def run_due(self) -> None:
        """Run every wakeup that has come due: leases and timeouts by the
        monotonic clock, delayed jobs and cron ticks by the wall clock."""
        if self.stopped or not self._machine.group.writable:
            return
        self._expire_due(self._clock.monotonic_ns())
        self._wake_due(self._clock.wall_ns())

    def _expire_due(self, mono: int) -> None:
        leases = self._leases
        jobs = self._machine.state.jobs
        expiring: list[Job] = []
        while leases and leases[0][0] <= mono + _SLACK_NS:
            at, job_id = heapq.heappop(leases)
            job = jobs.get(job_id)
            if job is None or job.state != LEASED or job.timer_ns != at:
                continue  # ended, or a newer timer stands
            job.timer_ns = 0
            deadline = min(job.lease_end_mono, job.timeout_mono)
            if deadline <= mono + _SLACK_NS:
                expiring.append(job)
            else:  # heartbeats moved it on
                job.timer_ns = deadline
                heapq.heappush(leases, (deadline, job_id))
        if expiring:
            self.expire(expiring)

    def _wake_due(self, now: int) -> None:
        heap = self._heap
        due_queues: set[str] = set()
        schedules: set[tuple[str, str]] = set()
        while heap and heap[0][0] <= now + _SLACK_NS:
            _, _, kind, key = heapq.heappop(heap)
            if kind == _DUE:
                due_queues.add(key[0])
            else:
                schedules.add((key[0], key[1]))
        state = self._machine.state
        for name in due_queues:
            queue = state.queues.get(name)
            if queue is None:
                continue
            if queue.promote(now):
                self.ready(name)
            due = queue.next_due()
            if due is not None and due > now:
                self._push(due, _DUE, (name,))
        for key in schedules:
            schedule = state.schedules.get(key)
            if schedule is not None:
                self.fire(schedule, now)

    # -- decisions the clock makes -------------------------------------------------------

    def expire(self, jobs: Sequence[Job]) -> int:
        """End the attempts of leased jobs whose lease or timeout ran out; the seq."""
        now = self._clock.wall_ns()
        ends = [self.deadline_end(job, now) for job in jobs]
        return self._machine.propose(jobs[0].queue, spb.SchedulerCommand(
            end=spb.EndAttempts(ends=ends)), now).seq

    def deadline_end(self, job: Job, now: int) -> spb.EndAttempt:
        """How a leased job's attempt ends once its deadline passed (``now``, the
        wall instant a retry's delay counts from)."""
        if self.timeout_left(job) <= _SLACK_NS:
            failures = job.attempt_count
            dead = failures >= job.max_attempts
            return spb.EndAttempt(
                job_id=job.job_id, lease_token=job.lease_token,
                outcome=pb.ATTEMPT_OUTCOME_TIMED_OUT, dead=dead,
                error=f"timed out after {job.timeout_ns / 1e9:g} s",
                run_ns=0 if dead else now + job.backoff.delay_ns(failures, random.random()))
        losses = job.lease_losses + 1
        dead = losses >= self._limits.max_lease_losses
        error = f"lease of worker {job.worker_id!r} expired"
        if dead:
            error += f" ({losses} times: the job may be crashing its workers)"
        return spb.EndAttempt(job_id=job.job_id, lease_token=job.lease_token,
                              outcome=pb.ATTEMPT_OUTCOME_LEASE_EXPIRED, dead=dead,
                              error=error, run_ns=0 if dead else job.run_ns)

    def fire(self, schedule: Schedule, now: int) -> None:
        """Fire a schedule's due ticks: oldest first, at most the catch-up maximum;
        the rest are skipped."""
        r = schedule.record
        if r.next_fire_ns > now + _SLACK_NS:
            return  # replaced or fired meanwhile: its own wakeup stands
        expr = self._crons.get(r.cron)
        if expr is None:
            expr = self._crons[r.cron] = cron.parse(r.cron)
        tz = cron.zone(r.timezone)
        ticks: list[int] = []
        tick: int | None = r.next_fire_ns
        while tick is not None and tick <= now + _SLACK_NS \
                and len(ticks) < self._limits.cron_catch_up:
            ticks.append(tick)
            tick = expr.next_after(tick, tz)
        skipped = 0
        while tick is not None and tick <= now and skipped < _SKIP_COUNT_LIMIT:
            skipped += 1
            tick = expr.next_after(tick, tz)
        if tick is not None and tick <= now:
            tick = expr.next_after(now, tz)
        if tick is None:  # never again (the horizon passed): park it far ahead
            tick = now + 100 * 365 * 86_400 * 1_000_000_000
        queues = self._machine.state.queues
        key = r.template.unique_key
        for i, at in enumerate(ticks):
            last = i == len(ticks) - 1
            queue = queues.get(r.queue)
            enqueue = not (key and queue is not None and queue.holder(key, now) is not None)
            self._machine.propose(r.queue, spb.SchedulerCommand(fire=spb.FireSchedule(
                queue=r.queue, schedule_id=r.schedule_id, tick_ns=at,
                next_fire_ns=tick if last else ticks[i + 1], enqueue=enqueue,
                skipped=skipped if last else 0)))

    def sweep(self, now: int) -> int:
        """Remove finished jobs past their retention; how many."""
        retained = self._retained
        jobs = self._machine.state.jobs
        ids: list[str] = []
        while retained and retained[0][0] <= now and len(ids) < _REMOVE_BATCH:
            at, job_id = heapq.heappop(retained)
            job = jobs.get(job_id)
            if job is not None and job.state in (SUCCEEDED, CANCELLED) \
                    and job.finish_ns + job.retention_ns == at:
                ids.append(job_id)
        if ids:
            self._machine.propose(jobs[ids[0]].queue, spb.SchedulerCommand(
                remove=spb.RemoveJobs(job_ids=ids)))
        return len(ids)

    def forget(self, now: int) -> int:
        """Forget request ids past their retention (a replicated command); how many."""
        heap = self._requests
        queues = self._machine.state.queues
        gone: list[spb.RequestRecord] = []
        while heap and heap[0][0] <= now and len(gone) < _REMOVE_BATCH:
            at, name, request_id = heapq.heappop(heap)
            queue = queues.get(name)
            request = queue.requests.get(request_id) if queue is not None else None
            if request is not None and request[REQUEST_EXPIRE_NS] == at:
                gone.append(spb.RequestRecord(queue=name, request_id=request_id, expire_ns=at))
        if gone:
            self._machine.propose(gone[0].queue, spb.SchedulerCommand(
                forget=spb.ForgetRequests(requests=gone)))
        return len(gone)
