"""The primary's decisions for each request (`SchedulerMachine.decisions`).

Each decision checks the request against the state and proposes its command
(`SchedulerMachine.propose`) with no await in between, so two requests never
both pass a check the other invalidates (a unique key, a lease token). Times
are the primary's clock.
Every method returns the seq of the command to wait for before answering (for
a retried Complete or Fail, or a duplicate Enqueue: the seq that made the
state it reports).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.errors import MeshStatusError, ServiceError
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.scheduler import errors
from nodes.scheduler.claims import Claimed, Room, Source, claim, pick
from nodes.scheduler.model import DEAD, LEASED, WAITING, Job, Schedule
from nodes.scheduler.state import lease_token

if TYPE_CHECKING:
    from nodes.replication.group import Group, Proposal
    from nodes.scheduler.leader import Leader
    from nodes.scheduler.machine import SchedulerMachine

__all__ = ["Completed", "Decisions", "Enqueued", "Failed", "Next"]

_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What an Enqueue did: the job (None when replayed and no longer kept)."""

    job_id: str
    job: Job | None
    duplicate: bool
    seq: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    """What a Fail did: the job's state, the retry's run time, attempts so far
    (and the next jobs it leased)."""

    state: int
    run_ns: int
    attempts: int
    seq: int
    claimed: list[Claimed] = field(default_factory=list)


Completed = tuple[int, int, list[Claimed]]
"""What a Complete did: the finish time, the seq to wait for, the next jobs leased."""


@dataclass(frozen=True, slots=True)
class Next:
    """What a Complete or Fail leases next (``ClaimNext``): from these queues,
    to this worker."""

    sources: Sequence[Source]
    worker_id: str
    max_jobs: int
    lease_ns: int
    room: Room
    """What the answer may still carry (a batch's items share one)."""


class Decisions:
    """The request decisions of one group's primary. They read the machine's state
    and change it only by proposing commands, which `SchedulerMachine.apply` runs."""

    def __init__(self, machine: SchedulerMachine) -> None:
        self._machine = machine
        self.state = machine.state  # read only here; `apply` is its one writer
        self.limits = machine.limits
        self.clock = machine.clock

    @property
    def group(self) -> Group:
        return self._machine.group

    @property
    def leader(self) -> Leader | None:
        """The group's timers and long polls, while this node leads it."""
        return self._machine.leader

    def propose(self, queue: str, command: spb.SchedulerCommand,
                issued_ns: int | None = None) -> Proposal:
        return self._machine.propose(queue, command, issued_ns)

    # -- jobs --------------------------------------------------------------------

    def enqueue(self, spec: spb.JobRecord, strict: bool, now: int,
                request_id: str = "") -> Enqueued:
        """Add a job unless its request id already made one (then: that job) or its
        unique key is held (then: the holder)."""
        queue = self.state.queues.get(spec.queue)
        if queue is not None:
            if request_id:
                seen = queue.requests.get(request_id)
                if seen is not None:
                    # Answered once what made it is committed (and the job's
                    # latest change, which the answer shows).
                    seen_id, _, seen_seq = seen
                    job = self.state.jobs.get(seen_id)
                    seq = max(seen_seq, job.seq if job is not None else 0)
                    return Enqueued(seen_id, job, False, seq, replayed=True)
            if spec.unique_key:
                holder = queue.holder(spec.unique_key, now)
                if holder is not None:
                    if strict:
                        raise errors.duplicate_job(spec.queue, spec.unique_key, holder.job_id)
                    return Enqueued(holder.job_id, holder, True, holder.seq)
            if queue.unfinished >= self.limits.max_queue_jobs:
                raise errors.queue_full(spec.queue, self.limits.max_queue_jobs)
        command = spb.EnqueueJob(job=spec)
        if request_id:
            command.request_id = request_id
            command.request_expire_ns = now + int(self.limits.request_retention * 1e9)
        proposal = self.propose(spec.queue, spb.SchedulerCommand(enqueue=command))
        job = proposal.result
        return Enqueued(job.job_id, job, False, proposal.seq)

    def enqueue_batch(self, items: Sequence[tuple[spb.JobRecord, bool, str]], now: int
                      ) -> list[Enqueued | ServiceError]:
        """Each ``(spec, strict, request_id)`` as `enqueue` would answer it, the new
        jobs made by one command. A request id or unique key repeated within the
        batch is answered by the batch's own earlier job."""
        state, retain = self.state, int(self.limits.request_retention * 1e9)
        new: list[spb.EnqueueJob] = []
        # Per item: an answer now, an error, or (how, index of the new job it names).
        outcomes: list[Enqueued | ServiceError | tuple[str, int]] = []
        by_request: dict[tuple[str, str], int] = {}
        by_key: dict[tuple[str, str], int] = {}
        added: dict[str, int] = {}
        for spec, strict, request_id in items:
            name = spec.queue
            queue = state.queues.get(name)
            if request_id:
                if (name, request_id) in by_request:
                    outcomes.append(("replayed", by_request[name, request_id]))
                    continue
                seen = queue.requests.get(request_id) if queue is not None else None
                if seen is not None:
                    seen_id, _, seen_seq = seen
                    job = state.jobs.get(seen_id)
                    outcomes.append(Enqueued(seen_id, job, False, max(
                        seen_seq, job.seq if job is not None else 0), replayed=True))
                    continue
            if spec.unique_key:
                if (name, spec.unique_key) in by_key:
                    outcomes.append(("strict" if strict else "duplicate",
                                     by_key[name, spec.unique_key]))
                    continue
                holder = queue.holder(spec.unique_key, now) if queue is not None else None
                if holder is not None:
                    outcomes.append(errors.duplicate_job(name, spec.unique_key, holder.job_id)
                                    if strict else Enqueued(holder.job_id, holder, True,
                                                            holder.seq))
                    continue
            unfinished = (queue.unfinished if queue is not None else 0) + added.get(name, 0)
            if unfinished >= self.limits.max_queue_jobs:
                outcomes.append(errors.queue_full(name, self.limits.max_queue_jobs))
                continue
            command = spb.EnqueueJob(job=spec)
            if request_id:
                command.request_id = request_id
                command.request_expire_ns = now + retain
                by_request[name, request_id] = len(new)
            if spec.unique_key:
                by_key[name, spec.unique_key] = len(new)
            added[name] = added.get(name, 0) + 1
            outcomes.append(("new", len(new)))
            new.append(command)
        made: list[Job] = []
        seq = 0
        if new:
            proposal = self.propose(new[0].job.queue, spb.SchedulerCommand(
                enqueue_jobs=spb.EnqueueJobs(jobs=new)))
            made, seq = proposal.result, proposal.seq
        answers: list[Enqueued | ServiceError] = []
        for outcome in outcomes:
            if not isinstance(outcome, tuple):
                answers.append(outcome)
                continue
            how, i = outcome
            job = made[i]
            if how == "strict":
                answers.append(errors.duplicate_job(job.queue, job.unique_key, job.job_id))
            else:
                answers.append(Enqueued(job.job_id, job, how == "duplicate", seq,
                                        replayed=how == "replayed"))
        return answers

    def lease(self, jobs: Sequence[Job], worker_id: str, lease_ns: int) -> Claimed:
        """Lease jobs `claims.pick` chose."""
        proposal = self.propose(jobs[0].queue, spb.SchedulerCommand(lease=spb.LeaseJobs(
            job_ids=[job.job_id for job in jobs], worker_id=worker_id, lease_ns=lease_ns)))
        seq = proposal.seq
        return Claimed(self._machine, seq, proposal.result, lease_token(self.group.epoch, seq))

    def abandon(self, claimed: Claimed) -> None:
        """A Claim call went away before its answer: put its jobs back at once."""
        if not self.group.writable:
            return  # the new primary's leases will expire
        ends = [spb.EndAttempt(job_id=job.job_id, lease_token=claimed.token,
                               outcome=pb.ATTEMPT_OUTCOME_ABANDONED, run_ns=job.run_ns)
                for job in claimed.jobs
                if job.state == LEASED and job.lease_token == claimed.token]
        if ends:
            self.propose(claimed.jobs[0].queue, spb.SchedulerCommand(
                end=spb.EndAttempts(ends=ends)))

    def job(self, job_id: str) -> Job:
        job = self.state.jobs.get(job_id)
        if job is None:
            raise errors.job_not_found(job_id)
        return job

    def _leading(self) -> Leader:
        """This primary's timers (a group that stepped down has none: its
        caller is told to go to the new primary)."""
        leader = self.leader
        if leader is None:
            raise errors.primary_lost(self.group.group_id)
        return leader

    def _live_lease(self, job_id: str, token: int) -> Job | None:
        """The job if ``token`` is its running lease, not yet run out. A lease whose
        end passed but whose timer has not run yet is ended here."""
        job = self.job(job_id)
        if job.state != LEASED or job.lease_token != token:
            return None
        leader = self._leading()
        if leader.ended(job):
            leader.expire([job])
            return None
        return job

    def heartbeat(self, job_id: str, token: int, extend_ns: int | None) -> tuple[Job, int]:
        job = self._live_lease(job_id, token)
        if job is None:
            raise errors.lease_lost(self.job(job_id))
        lease_ns = extend_ns or job.lease_ns
        # Never past the attempt's timeout, counted on the monotonic clock.
        grant = min(lease_ns, self._leading().timeout_left(job))
        seq = self.propose(job.queue, spb.SchedulerCommand(extend=spb.ExtendLease(
            job_id=job_id, lease_token=token, lease_ns=lease_ns,
            expire_ns=self.clock.wall_ns() + grant))).seq
        return job, seq

    def _end(self, job: Job, end: spb.EndAttempt, then: Next | None,
             now: int) -> tuple[int, list[Claimed]]:
        """Propose the end of ``job``'s attempt, stamped ``now`` (the instant a retry's
        delay counts from, so the attempt's finish time is that instant); with
        ``then``, lease the next jobs too: this group's in the same command, other
        groups' in their own."""
        command = spb.EndAttempts(ends=[end])
        picked = pick(then.sources, then.max_jobs, now, then.room) if then else {}
        mine = picked.pop(self._machine, [])
        if then is not None and mine:
            command.lease.CopyFrom(spb.LeaseJobs(job_ids=[j.job_id for j in mine],
                                                 worker_id=then.worker_id,
                                                 lease_ns=then.lease_ns))
        seq = self.propose(job.queue, spb.SchedulerCommand(end=command), now).seq
        claimed = [Claimed(self._machine, seq, mine, lease_token(self.group.epoch, seq))] \
            if mine else []
        if then is not None:
            claimed += [machine.decisions.lease(jobs, then.worker_id, then.lease_ns)
                        for machine, jobs in picked.items()]
        return seq, claimed

    def complete(self, job_id: str, token: int, result: bytes, then: Next | None = None
                 ) -> Completed:
        """``(finish_ns, seq, claimed)``; a repeat of a Complete that took effect is
        answered the same (and claims afresh)."""
        answer = self.complete_many([(job_id, token, result, then)])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def complete_many(self, items: Sequence[tuple[str, int, bytes, Next | None]]
                      ) -> list[Completed | ServiceError | MeshStatusError]:
        """Each ``(job_id, token, result, then)`` as `complete` answers it, the
        attempts ended, and this group's next jobs leased, by one command: a
        command per Complete cost a worker's batch of completions a log entry,
        an apply, a queue-counter row and an ack each on both copies."""
        now = self.clock.wall_ns()
        answers: list[Completed | ServiceError | MeshStatusError | None] = [None] * len(items)
        ends: list[spb.EndAttempt] = []
        ending: list[tuple[int, Job]] = []
        for k, (job_id, token, result, then) in enumerate(items):
            try:
                job = self._live_lease(job_id, token)
                if job is None:
                    job = self.job(job_id)
                    attempt = job.attempt(token)
                    if attempt is None or attempt.outcome != pb.ATTEMPT_OUTCOME_SUCCEEDED:
                        raise errors.lease_lost(job)
                    answers[k] = (attempt.finish_ns, job.seq, self._claim(then))
                    continue
            except (ServiceError, MeshStatusError) as exc:
                answers[k] = exc
                continue
            ends.append(spb.EndAttempt(job_id=job_id, lease_token=token,
                                       outcome=pb.ATTEMPT_OUTCOME_SUCCEEDED, result=result))
            ending.append((k, job))
        if ends:
            self._end_many(items, ending, ends, now, answers)
        done = [answer for answer in answers if answer is not None]
        assert len(done) == len(items), "every item answered"
        return done

    def _end_many(self, items: Sequence[tuple[str, int, bytes, Next | None]],
                  ending: list[tuple[int, Job]], ends: list[spb.EndAttempt], now: int,
                  answers: list[Completed | ServiceError | MeshStatusError | None]) -> None:
        """Propose ``ends`` and the next jobs the ``ending`` items ask for, this
        group's leased in the same command (if they share a worker and a lease
        length, as one pool's do), other groups' in their own."""
        mine: dict[int, list[Job]] = {}
        others: dict[int, dict[SchedulerMachine, list[Job]]] = {}
        lease: tuple[str, int] | None = None
        for k, _ in ending:
            then = items[k][3]
            if then is None:
                continue
            picked = pick(then.sources, then.max_jobs, now, then.room)
            jobs = picked.pop(self._machine, [])
            if jobs and lease in (None, (then.worker_id, then.lease_ns)):
                lease = (then.worker_id, then.lease_ns)
                mine[k] = jobs
            elif jobs:
                picked[self._machine] = jobs  # another worker's: a command of its own
            others[k] = picked
        command = spb.EndAttempts(ends=ends)
        if lease is not None:
            command.lease.CopyFrom(spb.LeaseJobs(
                job_ids=[job.job_id for jobs in mine.values() for job in jobs],
                worker_id=lease[0], lease_ns=lease[1]))
        seq = self.propose(ending[0][1].queue, spb.SchedulerCommand(end=command)).seq
        token = lease_token(self.group.epoch, seq)
        for k, job in ending:
            claimed = [Claimed(self._machine, seq, mine[k], token)] if k in mine else []
            then = items[k][3]
            if then is not None:
                claimed += [machine.decisions.lease(jobs, then.worker_id, then.lease_ns)
                            for machine, jobs in others[k].items()]
            answers[k] = (job.finish_ns, seq, claimed)

    def _claim(self, then: Next | None) -> list[Claimed]:
        if then is None:
            return []
        return claim(then.sources, then.worker_id, then.max_jobs, then.lease_ns,
                     self.clock.wall_ns(), then.room)

    def fail(self, job_id: str, token: int, error: str, retryable: bool,
             retry_delay_ns: int | None, then: Next | None = None) -> Failed:
        now = self.clock.wall_ns()
        job = self._live_lease(job_id, token)
        if job is None:
            job = self.job(job_id)
            attempt = job.attempt(token)
            if attempt is not None and attempt.outcome == pb.ATTEMPT_OUTCOME_FAILED:
                return Failed(DEAD if attempt.dead else WAITING, attempt.next_run_ns,
                              attempt.number, job.seq, self._claim(then))
            raise errors.lease_lost(job)
        failures = job.attempt_count
        dead = not retryable or failures >= job.max_attempts
        run_ns = 0
        if not dead:
            delay = retry_delay_ns if retry_delay_ns is not None \
                else job.backoff.delay_ns(failures, random.random())
            run_ns = now + delay
        seq, claimed = self._end(job, spb.EndAttempt(
            job_id=job_id, lease_token=token, outcome=pb.ATTEMPT_OUTCOME_FAILED, error=error,
            dead=dead, run_ns=run_ns), then, now)
        return Failed(job.state, run_ns, failures, seq, claimed)

    def cancel(self, job_id: str) -> tuple[bool, Job, int]:
        job = self.job(job_id)
        if job.finished:
            return False, job, job.seq
        seq = self.propose(job.queue, spb.SchedulerCommand(
            cancel=spb.CancelJob(job_id=job_id))).seq
        return True, job, seq

    # -- dead letters -------------------------------------------------------------------

    def _dead_ids(self, queue_name: str, job_ids: Sequence[str]) -> list[str]:
        if job_ids:
            jobs = self.state.jobs
            return [i for i in dict.fromkeys(job_ids)
                    if (j := jobs.get(i)) is not None and j.state == DEAD
                    and j.queue == queue_name]
        queue = self.state.queues.get(queue_name)
        return queue.dead_after(None, _BATCH) if queue is not None else []

    def _remaining(self, queue_name: str) -> int:
        queue = self.state.queues.get(queue_name)
        return len(queue.dead) if queue is not None else 0

    def requeue(self, queue: str, job_ids: Sequence[str]) -> tuple[int, int, int]:
        """``(requeued, remaining, seq)``: dead jobs (all of the queue's if no ids)
        made ready now."""
        ids = self._dead_ids(queue, job_ids)
        seq = self.propose(queue, spb.SchedulerCommand(requeue=spb.RequeueJobs(
            job_ids=ids))).seq if ids else 0
        return len(ids), self._remaining(queue), seq

    def purge(self, queue: str, job_ids: Sequence[str], everything: bool
              ) -> tuple[int, int, int]:
        """``(purged, remaining, seq)``."""
        ids = self._dead_ids(queue, job_ids) if job_ids or everything else []
        seq = self.propose(queue, spb.SchedulerCommand(remove=spb.RemoveJobs(
            job_ids=ids))).seq if ids else 0
        return len(ids), self._remaining(queue), seq

    # -- schedules -------------------------------------------------------------------

    def put_schedule(self, record: spb.ScheduleRecord, replace: bool) -> tuple[Schedule, int]:
        key = (record.queue, record.schedule_id)
        if key in self.state.schedules and not replace:
            raise errors.schedule_exists(record.queue, record.schedule_id)
        seq = self.propose(record.queue, spb.SchedulerCommand(
            put_schedule=spb.PutSchedule(schedule=record))).seq
        return self.state.schedules[key], seq

    def remove_schedule(self, queue: str, schedule_id: str) -> tuple[bool, int]:
        if (queue, schedule_id) not in self.state.schedules:
            return False, 0
        seq = self.propose(queue, spb.SchedulerCommand(remove_schedule=spb.RemoveSchedule(
            queue=queue, schedule_id=schedule_id))).seq
        return True, seq
