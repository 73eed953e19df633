"""One group's scheduler: the replicated state machine.

Every copy applies the primary's commands to its `SchedulerState`; applying
returns what the command did (the job it made, the jobs it leased, ...) and the
rows that put it on disk. On the primary, decisions (`nodes.scheduler.decisions`)
propose commands with `Group.propose`: a command is applied at once, exactly as
replicas will apply it, and its disk writes are queued before the commit point
is computed. While this copy leads, a `Leader` runs the primary's timers and
Claim waiters; it exists only then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from common.clock import SYSTEM_CLOCK, Clock
from common.slots import slot_for
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.config import SchedulerLimits
from nodes.replication.journal import JournalReader
from nodes.replication.machine import NOTHING, Applied, Persist
from nodes.scheduler.decisions import Decisions
from nodes.scheduler.ids import job_id
from nodes.scheduler.leader import Leader
from nodes.scheduler.model import LEASED, WAITING, Job
from nodes.scheduler.state import SchedulerState, lease_token, order_of
from nodes.scheduler.storage import Storage

if TYPE_CHECKING:
    from nodes.replication.group import Group, Proposal

__all__ = ["CHUNK_BYTES", "SCHEDULER", "SchedulerMachine"]

SCHEDULER = rpb.SERVICE_KIND_SCHEDULER
CHUNK_BYTES = 1 << 20
"""Snapshot chunks are cut at about this size (one job may exceed it a little)."""

Applier = Callable[["SchedulerMachine", Any, int, int, int], Applied]


class SchedulerMachine:
    """The scheduler of one group on this node: the replicated state and `apply`;
    the primary's request decisions are `decisions`, its timers `leader`."""

    service = SCHEDULER
    durable = True
    additive_restore = False

    def __init__(self, group: Group, journal: JournalReader, limits: SchedulerLimits,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._group = group
        self.limits = limits
        self.clock = clock  # the primary's decisions and timers only; apply never reads it
        self.state = SchedulerState()
        self._storage = Storage(group.group_id)
        self.leader: Leader | None = None
        if group.restored:  # read back from disk at start-up
            self._storage.load(journal, self.state, 0)
        self.decisions = Decisions(self)

    @property
    def group(self) -> Group:
        return self._group

    # -- replication (every copy) -----------------------------------------------

    def apply(self, command: rpb.Command) -> Applied:
        change = spb.SchedulerCommand.FromString(command.payload)
        kind = change.WhichOneof("change")
        if kind is None:
            return NOTHING
        return _APPLIERS[kind](self, getattr(change, kind), command.issued_at.ToNanoseconds(),
                               command.seq, command.epoch)

    def _apply_enqueue(self, c: spb.EnqueueJob, now: int, seq: int, epoch: int) -> Applied:
        """The result: the new `Job`."""
        writes: list[Persist] = []
        job = self._enqueue(c, now, seq, epoch, 0, writes)
        writes.extend(self._storage.jobs([job]))
        return Applied(job, writes)

    def _apply_enqueue_jobs(self, c: spb.EnqueueJobs, now: int, seq: int, epoch: int
                            ) -> Applied:
        """The result: the new `Job` s, in order."""
        writes: list[Persist] = []
        made = [self._enqueue(one, now, seq, epoch, i, writes) for i, one in enumerate(c.jobs)]
        writes.extend(self._storage.jobs(made))
        return Applied(made, writes)

    def _enqueue(self, c: spb.EnqueueJob, now: int, seq: int, epoch: int, index: int,
                 writes: list[Persist]) -> Job:
        """Add the ``index``-th job of a command (its row is the caller's to write)."""
        job = Job.of(c.job)
        job.job_id = job_id(job.queue, epoch, seq, index)
        self._begin(job, now, seq, index)
        if c.request_id:
            request = self.state.remember(job.queue, c.request_id, job.job_id,
                                          c.request_expire_ns, seq)
            writes.append(self._storage.request(job.queue, c.request_id, request))
            if self.leader is not None:
                self.leader.remembered(job.queue, c.request_id, request)
        return job

    def _apply_forget(self, c: spb.ForgetRequests, now: int, seq: int, epoch: int
                      ) -> Applied:
        """The result: how many request ids were forgotten."""
        gone = [(r.queue, r.request_id) for r in c.requests
                if self.state.forget(r.queue, r.request_id, r.expire_ns)]
        return Applied(len(gone), self._storage.requests_forgotten(gone))

    def _start(self, job: Job, now: int, seq: int) -> list[Persist]:
        self._begin(job, now, seq, 0)
        return self._storage.jobs([job])

    def _begin(self, job: Job, now: int, seq: int, index: int) -> None:
        job.state = WAITING
        job.enqueue_ns = now
        job.order = order_of(seq, index)
        job.seq = seq
        self.state.add(job, now)
        if self.leader is not None:
            self.leader.waiting(job)

    def _apply_lease(self, c: spb.LeaseJobs, now: int, seq: int, epoch: int) -> Applied:
        """The result: the jobs leased (those still waiting)."""
        leased = self._lease(c, now, seq, epoch)
        return Applied(leased, self._storage.jobs(leased))

    def _lease(self, c: spb.LeaseJobs, now: int, seq: int, epoch: int) -> list[Job]:
        token = lease_token(epoch, seq)
        jobs = self.state.jobs
        leased: list[Job] = []
        for id_ in c.job_ids:
            job = jobs.get(id_)
            if job is not None and job.state == WAITING:
                self.state.lease(job, token, c.worker_id, now, c.lease_ns, seq)
                leased.append(job)
        if self.leader is not None:
            for job in leased:
                self.leader.leased(job, now)
        return leased

    def _apply_extend(self, c: spb.ExtendLease, now: int, seq: int, epoch: int) -> Applied:
        job = self.state.jobs.get(c.job_id)
        if job is None or job.state != LEASED or job.lease_token != c.lease_token:
            return NOTHING
        self.state.extend(job, c.lease_ns, c.expire_ns, seq)
        if self.leader is not None:
            self.leader.extended(job, now)
        return Applied(job, self._storage.jobs([job]))

    def _apply_end(self, c: spb.EndAttempts, now: int, seq: int, epoch: int) -> Applied:
        """The result: the jobs whose attempt ended, then those leased after."""
        jobs = self.state.jobs
        changed: list[Job] = []
        for i, end in enumerate(c.ends):
            job = jobs.get(end.job_id)
            if job is None or job.state != LEASED or job.lease_token != end.lease_token:
                continue
            self.state.end(job, end, now, seq, order_of(seq, i))
            changed.append(job)
        writes = self._jobs_changed(changed, counters=True)
        if c.HasField("lease"):
            leased = self._lease(c.lease, now, seq, epoch)
            writes.extend(self._storage.jobs(leased))
            changed = changed + leased
        return Applied(changed, writes)

    def _apply_cancel(self, c: spb.CancelJob, now: int, seq: int, epoch: int) -> Applied:
        job = self.state.jobs.get(c.job_id)
        if job is not None and self.state.cancel(job, now, seq):
            return Applied(job, self._jobs_changed([job]))
        return NOTHING

    def _apply_requeue(self, c: spb.RequeueJobs, now: int, seq: int, epoch: int) -> Applied:
        jobs = self.state.jobs
        changed = []
        for i, id_ in enumerate(c.job_ids):
            job = jobs.get(id_)
            if job is not None and self.state.requeue(job, now, seq, order_of(seq, i)):
                changed.append(job)
        return Applied(changed, self._jobs_changed(changed))

    def _apply_remove(self, c: spb.RemoveJobs, now: int, seq: int, epoch: int) -> Applied:
        jobs = self.state.jobs
        removed = []
        for id_ in c.job_ids:
            job = jobs.get(id_)
            if job is not None:
                self.state.remove(job)
                removed.append(id_)
        return Applied(removed, self._storage.removed(removed))

    def _apply_put_schedule(self, c: spb.PutSchedule, now: int, seq: int, epoch: int
                            ) -> Applied:
        record = spb.ScheduleRecord()
        record.CopyFrom(c.schedule)
        record.create_ns = now
        schedule = self.state.put_schedule(record, seq)
        if self.leader is not None:
            self.leader.scheduled(schedule)
        return Applied(schedule, [self._storage.schedule(schedule)])

    def _apply_remove_schedule(self, c: spb.RemoveSchedule, now: int, seq: int, epoch: int
                               ) -> Applied:
        if self.state.remove_schedule(c.queue, c.schedule_id) is None:
            return NOTHING
        return Applied(True, [self._storage.schedule_removed(c.queue, c.schedule_id)])

    def _apply_fire(self, c: spb.FireSchedule, now: int, seq: int, epoch: int) -> Applied:
        """The result: the job the firing made, if any."""
        schedule = self.state.schedules.get((c.queue, c.schedule_id))
        if schedule is None or c.tick_ns <= schedule.record.last_tick_ns:
            return NOTHING  # a tick never fires twice
        r = schedule.record
        r.last_tick_ns = c.tick_ns
        r.next_fire_ns = c.next_fire_ns
        r.skipped_total += c.skipped
        schedule.seq = seq
        writes: list[Persist] = []
        job = None
        if c.enqueue:
            job = Job.of(r.template)
            job.job_id = job_id(r.queue, epoch, seq)
            job.queue, job.schedule_id, job.run_ns = r.queue, r.schedule_id, c.tick_ns
            if r.template.unique_ttl_ns:
                job.unique_expire_ns = now + r.template.unique_ttl_ns
            writes = self._start(job, now, seq)
            r.last_job_id = job.job_id
            r.fired_total += 1
        else:
            r.skipped_total += 1
        writes.append(self._storage.schedule(schedule))
        if self.leader is not None:
            self.leader.scheduled(schedule)
        return Applied(job, writes)

    def _jobs_changed(self, jobs: list[Job], counters: bool = False) -> list[Persist]:
        writes = self._storage.jobs(jobs)
        if counters:
            writes.extend(self._storage.queue(self.state.queue(name))
                          for name in {job.queue for job in jobs})
        leader = self.leader
        if leader is not None:
            for job in jobs:
                if job.state == WAITING:
                    leader.waiting(job)
                elif job.finished:
                    leader.finished(job)
        return writes

    def snapshot(self) -> list[tuple[int, bytes]]:
        """Jobs, schedules, queue counters and request ids, cut in ~1 MiB chunks."""
        chunks: list[tuple[int, bytes]] = []
        chunk, size = spb.SchedulerSnapshotChunk(), 0

        def cut() -> None:
            nonlocal chunk, size
            chunks.append((0, chunk.SerializeToString()))
            chunk, size = spb.SchedulerSnapshotChunk(), 0

        for queue in self.state.queues.values():
            t = queue.totals
            chunk.queues.append(spb.QueueRecord(
                queue=queue.name, succeeded_total=t.succeeded,
                failed_attempts_total=t.failed_attempts, lease_losses_total=t.lease_losses))
            size += len(queue.name) + 32
        for schedule in self.state.schedules.values():
            chunk.schedules.append(schedule.record)
            size += schedule.record.ByteSize()
        for queue in self.state.queues.values():
            for request_id, (made, expire_ns, _) in queue.requests.items():
                chunk.requests.append(spb.RequestRecord(
                    queue=queue.name, request_id=request_id, job_id=made,
                    expire_ns=expire_ns))
                size += len(queue.name) + len(request_id) + len(made) + 16
                if size >= CHUNK_BYTES:
                    cut()
        for job in self.state.jobs.values():
            record = job.to_record()
            chunk.jobs.append(record)
            size += record.ByteSize()
            if size >= CHUNK_BYTES:
                cut()
        if size or not chunks:
            cut()
        return chunks

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> list[Persist]:
        jobs: list[Job] = []
        schedules: list[spb.ScheduleRecord] = []
        queues: list[spb.QueueRecord] = []
        requests: list[spb.RequestRecord] = []
        for _, data in chunks:
            chunk = spb.SchedulerSnapshotChunk.FromString(data)
            jobs.extend(Job.of(r) for r in chunk.jobs)
            schedules.extend(chunk.schedules)
            queues.extend(chunk.queues)
            requests.extend(chunk.requests)
        self.state.clear()
        self.state.load(jobs, schedules, queues, 0, requests)
        return self._storage.replace(self.state)

    def role_changed(self) -> None:
        if self._group.writable and self.leader is None:
            self.leader = Leader(self, self.limits, self.clock)
            self.leader.start(self.clock.wall_ns())
        elif not self._group.writable and self.leader is not None:
            leader, self.leader = self.leader, None
            leader.stop()

    def close(self) -> None:
        """The group leaves (or is rebuilt): stop leading, forget the state. Its
        rows stay on disk: whether they go is the replication layer's call."""
        if self.leader is not None:
            leader, self.leader = self.leader, None
            leader.stop()
        self.state.clear()

    # -- proposing (primary) ------------------------------------------------------

    def propose(self, queue: str, command: spb.SchedulerCommand,
                issued_ns: int | None = None) -> Proposal:
        """Apply a command here and send it to the replicas (`Group.propose`)."""
        return self._group.propose(slot_for(queue), SCHEDULER, command.SerializeToString(),
                                   issued_ns)


_APPLIERS: dict[str, Applier] = {
    "enqueue": SchedulerMachine._apply_enqueue,
    "lease": SchedulerMachine._apply_lease,
    "extend": SchedulerMachine._apply_extend,
    "end": SchedulerMachine._apply_end,
    "cancel": SchedulerMachine._apply_cancel,
    "requeue": SchedulerMachine._apply_requeue,
    "remove": SchedulerMachine._apply_remove,
    "put_schedule": SchedulerMachine._apply_put_schedule,
    "remove_schedule": SchedulerMachine._apply_remove_schedule,
    "fire": SchedulerMachine._apply_fire,
    "forget": SchedulerMachine._apply_forget,
    "enqueue_jobs": SchedulerMachine._apply_enqueue_jobs,
}
