"""One group's scheduler state and the changes commands make to it.

Pure and deterministic: each change depends only on the state and its
arguments (the command's time, seq and epoch among them), so every copy of a
group that applies the same commands holds the same jobs and schedules. The
choices (which jobs, which delays) were made by the primary and arrive as
arguments. Persistence is the machine's business (`nodes.scheduler.storage`).
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.scheduler.model import (
    CANCELLED,
    DEAD,
    LEASED,
    MAX_HISTORY,
    REQUEST_EXPIRE_NS,
    SUCCEEDED,
    WAITING,
    Attempt,
    Job,
    Request,
    Schedule,
)
from nodes.scheduler.queues import Queue
from nodes.scheduler.table import JobTable

__all__ = ["EPOCH_SHIFT", "SchedulerState", "lease_token"]

EPOCH_SHIFT = 32
_REFUNDED = frozenset({pb.ATTEMPT_OUTCOME_LEASE_EXPIRED, pb.ATTEMPT_OUTCOME_ABANDONED})
_FAILED = frozenset({pb.ATTEMPT_OUTCOME_FAILED, pb.ATTEMPT_OUTCOME_TIMED_OUT})


def lease_token(epoch: int, seq: int) -> int:
    """The fencing token of leases granted by command ``(epoch, seq)``: it grows
    with seq within an epoch and with the epoch across failovers."""
    return epoch << EPOCH_SHIFT | (seq & 0xFFFF_FFFF)


def order_of(seq: int, index: int) -> int:
    """FIFO order of the ``index``-th job a command makes waiting."""
    return seq << 16 | index


class SchedulerState:
    """Jobs, queues and schedules of one group."""

    def __init__(self) -> None:
        self.jobs = JobTable()
        self.queues: dict[str, Queue] = {}
        self.schedules: dict[tuple[str, str], Schedule] = {}

    def queue(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(name, self.jobs)
        return queue

    # -- job changes -------------------------------------------------------------

    def add(self, job: Job, now_ns: int) -> None:
        """A new waiting job (its unique key, if any, is taken)."""
        self.jobs.add(job)
        queue = self.queue(job.queue)
        queue.add_waiting(job, now_ns)
        if job.unique_key:
            queue.unique[job.unique_key] = job

    def lease(self, job: Job, token: int, worker_id: str, now_ns: int, lease_ns: int,
              seq: int) -> None:
        queue = self.queue(job.queue)
        queue.remove_waiting(job)
        job.state = LEASED
        job.attempt_count += 1
        job.worker_id = worker_id
        job.lease_token = token
        job.lease_ns = lease_ns
        job.timeout_at_ns = now_ns + job.timeout_ns
        job.lease_expire_ns = min(now_ns + lease_ns, job.timeout_at_ns)
        job.attempts = (*job.attempts[1 - MAX_HISTORY:],
                        Attempt(job.attempt_count, worker_id, now_ns, token))
        job.seq = seq
        queue.count_in(job, 1)

    def extend(self, job: Job, lease_ns: int, expire_ns: int, seq: int) -> None:
        job.lease_ns = lease_ns
        job.lease_expire_ns = expire_ns
        job.seq = seq

    def end(self, job: Job, end: spb.EndAttempt, now_ns: int, seq: int, order: int) -> None:
        """The running attempt ended (``end`` says how and what follows)."""
        queue = self.queue(job.queue)
        queue.count_in(job, -1)
        outcome = end.outcome
        attempt = job.attempt(job.lease_token)
        if attempt is not None:
            attempt.finish_ns = now_ns
            attempt.outcome = outcome
            attempt.error = end.error
        self._clear_lease(job)
        job.seq = seq
        if outcome == pb.ATTEMPT_OUTCOME_SUCCEEDED:
            job.state = SUCCEEDED
            job.finish_ns = now_ns
            job.result = end.result
            queue.totals.succeeded += 1
            queue.release_key(job)
            queue.count_in(job, 1)
            self.jobs.finish(job)
            return
        if outcome in _REFUNDED:
            job.attempt_count -= 1
            if outcome == pb.ATTEMPT_OUTCOME_LEASE_EXPIRED:
                job.lease_losses += 1
                queue.totals.lease_losses += 1
        elif outcome in _FAILED:
            queue.totals.failed_attempts += 1
            job.last_error = end.error
        if attempt is not None:
            attempt.dead = end.dead
            attempt.next_run_ns = 0 if end.dead else end.run_ns
        if end.dead:
            self._die(job, queue, now_ns, end.error)
        else:
            job.state = WAITING
            job.run_ns = end.run_ns
            job.order = order
            queue.add_waiting(job, now_ns)

    def cancel(self, job: Job, now_ns: int, seq: int) -> bool:
        """Cancel an unfinished job; False if it had finished."""
        if job.finished:
            return False
        queue = self.queue(job.queue)
        if job.state == LEASED:
            queue.count_in(job, -1)
            attempt = job.attempt(job.lease_token)
            if attempt is not None:
                attempt.finish_ns = now_ns
                attempt.outcome = pb.ATTEMPT_OUTCOME_CANCELLED
            self._clear_lease(job)
        else:
            queue.remove_waiting(job)
        job.state = CANCELLED
        job.finish_ns = now_ns
        job.seq = seq
        queue.release_key(job)
        queue.count_in(job, 1)
        self.jobs.finish(job)
        return True

    def requeue(self, job: Job, now_ns: int, seq: int, order: int) -> bool:
        """A dead job (as `JobTable.get` gives it) is ready again with a fresh
        budget; False if not dead."""
        if job.state != DEAD:
            return False
        self.jobs.revive(job)
        queue = self.queue(job.queue)
        queue.count_in(job, -1)
        job.state = WAITING
        job.attempt_count = job.lease_losses = 0
        job.finish_ns = 0
        job.run_ns = now_ns
        job.order = order
        job.seq = seq
        queue.add_waiting(job, now_ns)
        return True

    def remove(self, job: Job) -> None:
        """Forget a job (purged, or past its retention)."""
        queue = self.queue(job.queue)
        if job.state == WAITING:
            queue.remove_waiting(job)
        else:
            queue.count_in(job, -1)
        queue.release_key(job)
        self.jobs.remove(job.job_id)

    def _die(self, job: Job, queue: Queue, now_ns: int, error: str) -> None:
        job.state = DEAD
        job.finish_ns = now_ns
        if error:
            job.last_error = error
        queue.release_key(job)
        queue.count_in(job, 1)
        self.jobs.finish(job)

    @staticmethod
    def _clear_lease(job: Job) -> None:
        job.worker_id = ""
        job.lease_token = job.lease_ns = job.lease_expire_ns = job.timeout_at_ns = 0
        job.timer_ns = job.lease_end_mono = job.timeout_mono = 0

    # -- request ids -----------------------------------------------------------------

    def remember(self, queue: str, request_id: str, job_id: str, expire_ns: int,
                 seq: int) -> Request:
        """``request_id`` made ``job_id`` in ``queue`` (a replay answers it)."""
        request = (job_id, expire_ns, seq)
        self.queue(queue).requests[request_id] = request
        return request

    def forget(self, queue: str, request_id: str, expire_ns: int) -> bool:
        """Forget a request id still remembered with ``expire_ns``; whether it was."""
        found = self.queues.get(queue)
        if found is None:
            return False
        request = found.requests.get(request_id)
        if request is None or request[REQUEST_EXPIRE_NS] != expire_ns:
            return False
        del found.requests[request_id]
        return True

    # -- schedules -------------------------------------------------------------------

    def put_schedule(self, record: spb.ScheduleRecord, seq: int) -> Schedule:
        schedule = Schedule(record, seq)
        self.schedules[schedule.key] = schedule
        return schedule

    def remove_schedule(self, queue: str, schedule_id: str) -> Schedule | None:
        return self.schedules.pop((queue, schedule_id), None)

    # -- whole state --------------------------------------------------------------------

    def load(self, jobs: Iterable[Job], schedules: Iterable[spb.ScheduleRecord],
             queues: Iterable[spb.QueueRecord], now_ns: int,
             requests: Iterable[spb.RequestRecord] = ()) -> None:
        """Add state read back from a snapshot or the disk, and index it."""
        for q in requests:
            self.queue(q.queue).requests[q.request_id] = (q.job_id, q.expire_ns, 0)
        for r in queues:
            totals = self.queue(r.queue).totals
            totals.succeeded = r.succeeded_total
            totals.failed_attempts = r.failed_attempts_total
            totals.lease_losses = r.lease_losses_total
        holders: dict[tuple[str, str], Job] = {}
        for job in jobs:
            self.jobs.add(job)
            queue = self.queue(job.queue)
            if job.state == WAITING:
                queue.add_waiting(job, now_ns)
            else:
                queue.count_in(job, 1)
            if job.unique_key and not job.finished:
                key = (job.queue, job.unique_key)
                held = holders.get(key)
                if held is None or (job.enqueue_ns, job.job_id) > (held.enqueue_ns,
                                                                    held.job_id):
                    holders[key] = job
        for (queue_name, unique_key), job in holders.items():
            self.queue(queue_name).unique[unique_key] = job
        for record in schedules:
            self.put_schedule(record, 0)

    def clear(self) -> None:
        self.jobs.clear()
        self.queues.clear()
        self.schedules.clear()
