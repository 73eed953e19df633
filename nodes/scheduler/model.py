"""The scheduler's in-memory shapes: jobs, their attempts, retry delays, schedules.

Every copy of a group holds the same jobs (what ``JobRecord`` stores); a few
fields are bookkeeping that is not stored: which index holds a waiting job, the
seq of the command that last changed it (reads wait until it is committed), and
the primary's timer for its lease.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb

__all__ = [
    "CANCELLED",
    "DEAD",
    "FINISHED",
    "LEASED",
    "MAX_HISTORY",
    "REQUEST_EXPIRE_NS",
    "SUCCEEDED",
    "WAITING",
    "Attempt",
    "Backoff",
    "FrozenJob",
    "Job",
    "Request",
    "Schedule",
]

WAITING = pb.JOB_STATE_PENDING
"""Stored for PENDING and SCHEDULED alike: which one it is depends on run_ns."""
LEASED = pb.JOB_STATE_LEASED
SUCCEEDED = pb.JOB_STATE_SUCCEEDED
DEAD = pb.JOB_STATE_DEAD
CANCELLED = pb.JOB_STATE_CANCELLED
FINISHED = frozenset({SUCCEEDED, DEAD, CANCELLED})
MAX_HISTORY = 100
"""Attempts kept per job (the oldest are dropped)."""

# Where a waiting job is indexed (Queue): not at all, ready, delayed.
NOWHERE, READY, DELAYED = 0, 1, 2

FrozenBackoff = tuple[int, int, float, float]
FrozenAttempt = tuple[int, str, int, int, int, int, str, bool, int]
FrozenJob = tuple[str, str, str, bytes, int, int, FrozenBackoff, int, int, int, int, int, str,
                  int, int, int, int, str, int, int, int, int, int, bytes, str, str,
                  tuple[FrozenAttempt, ...], int]
"""A finished `Job` as a tuple of strings, bytes and numbers (`Job.frozen`): the
garbage collector does not track it (see `nodes.scheduler.table`)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays, nanoseconds."""

    initial_ns: int
    max_ns: int
    multiplier: float
    jitter: float

    def delay_ns(self, failures: int, draw: float) -> int:
        """The wait after ``failures`` failed attempts (>= 1), with ``draw`` uniform
        in [0, 1) (the primary's random draw)."""
        try:
            grown = self.initial_ns * self.multiplier ** (failures - 1)
        except OverflowError:  # e.g. multiplier 1000 after 200 failures: past any max
            grown = float(self.max_ns)
        base = min(float(self.max_ns), grown)
        return int(base * (1.0 - self.jitter * draw))

    def to_record(self) -> spb.BackoffRecord:
        return spb.BackoffRecord(initial_ns=self.initial_ns, max_ns=self.max_ns,
                                 multiplier=self.multiplier, jitter=self.jitter)

    @classmethod
    def of(cls, r: spb.BackoffRecord) -> Backoff:
        return shared_backoff(r.initial_ns, r.max_ns, r.multiplier, r.jitter)


@functools.lru_cache(maxsize=1024)
def shared_backoff(initial_ns: int, max_ns: int, multiplier: float, jitter: float) -> Backoff:
    """One `Backoff` for all the jobs that retry alike (most take their queue's or
    the node's defaults), not an object per job for the garbage collector to walk."""
    return Backoff(initial_ns, max_ns, multiplier, jitter)


@dataclass(slots=True)
class Attempt:
    """One attempt at a job."""

    number: int
    worker_id: str
    start_ns: int
    token: int
    finish_ns: int = 0
    outcome: int = pb.ATTEMPT_OUTCOME_RUNNING
    error: str = ""
    dead: bool = False
    next_run_ns: int = 0

    def to_record(self) -> spb.AttemptRecord:
        return spb.AttemptRecord(
            number=self.number, worker_id=self.worker_id, start_ns=self.start_ns,
            finish_ns=self.finish_ns, outcome=self.outcome,  # type: ignore[arg-type]
            error=self.error, lease_token=self.token, dead=self.dead,
            next_run_ns=self.next_run_ns)

    @classmethod
    def of(cls, r: spb.AttemptRecord) -> Attempt:
        return cls(r.number, r.worker_id, r.start_ns, r.lease_token, r.finish_ns, r.outcome,
                   r.error, r.dead, r.next_run_ns)


@dataclass(slots=True, eq=False)
class Job:
    """A job, as every copy of its group keeps it."""

    job_id: str
    queue: str
    type: str
    payload: bytes
    priority: int
    max_attempts: int
    backoff: Backoff
    timeout_ns: int
    retention_ns: int
    enqueue_ns: int
    run_ns: int
    state: int = WAITING
    unique_key: str = ""
    unique_expire_ns: int = 0
    order: int = 0
    attempt_count: int = 0
    lease_losses: int = 0
    worker_id: str = ""
    lease_token: int = 0
    lease_ns: int = 0
    lease_expire_ns: int = 0
    timeout_at_ns: int = 0
    finish_ns: int = 0
    result: bytes = b""
    last_error: str = ""
    schedule_id: str = ""
    attempts: tuple[Attempt, ...] = ()
    """Oldest first. A tuple, so that a job never attempted holds no container the
    garbage collector tracks."""
    # Not stored:
    seq: int = 0
    """The last command that changed it (0: read back from disk or a snapshot)."""
    where: int = NOWHERE
    timer_ns: int = 0
    """Primary only: when its lease timer fires, on the monotonic clock (0: none)."""
    lease_end_mono: int = 0
    """Primary only: when its lease ends, on this primary's monotonic clock."""
    timeout_mono: int = 0
    """Primary only: when its attempt times out, on this primary's monotonic clock."""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def attempt(self, token: int) -> Attempt | None:
        """The attempt that held lease ``token``, if still in the history."""
        for attempt in reversed(self.attempts):
            if attempt.token == token:
                return attempt
        return None

    def holds_key(self, now_ns: int) -> bool:
        """Whether its unique key still blocks a duplicate."""
        return not self.finished and (not self.unique_expire_ns
                                      or self.unique_expire_ns > now_ns)

    def to_record(self) -> spb.JobRecord:
        return spb.JobRecord(
            job_id=self.job_id, queue=self.queue, type=self.type, payload=self.payload,
            priority=self.priority, state=self.state,  # type: ignore[arg-type]
            attempt_count=self.attempt_count, max_attempts=self.max_attempts,
            backoff=self.backoff.to_record(), timeout_ns=self.timeout_ns,
            unique_key=self.unique_key, unique_expire_ns=self.unique_expire_ns,
            retention_ns=self.retention_ns, enqueue_ns=self.enqueue_ns, run_ns=self.run_ns,
            order=self.order, worker_id=self.worker_id, lease_token=self.lease_token,
            lease_ns=self.lease_ns, lease_expire_ns=self.lease_expire_ns,
            timeout_at_ns=self.timeout_at_ns, finish_ns=self.finish_ns, result=self.result,
            last_error=self.last_error, attempts=[a.to_record() for a in self.attempts],
            schedule_id=self.schedule_id, lease_losses=self.lease_losses)

    def frozen(self) -> FrozenJob:
        """Every stored field and ``seq``, for `thawed` (the primary's bookkeeping of
        a running lease is not kept: a finished job has none)."""
        b = self.backoff
        return (self.job_id, self.queue, self.type, self.payload, self.priority,
                self.max_attempts, (b.initial_ns, b.max_ns, b.multiplier, b.jitter),
                self.timeout_ns, self.retention_ns, self.enqueue_ns, self.run_ns, self.state,
                self.unique_key, self.unique_expire_ns, self.order, self.attempt_count,
                self.lease_losses, self.worker_id, self.lease_token, self.lease_ns,
                self.lease_expire_ns, self.timeout_at_ns, self.finish_ns, self.result,
                self.last_error, self.schedule_id,
                tuple([(a.number, a.worker_id, a.start_ns, a.token, a.finish_ns, a.outcome,
                        a.error, a.dead, a.next_run_ns) for a in self.attempts]), self.seq)

    @classmethod
    def thawed(cls, f: FrozenJob) -> Job:
        """A new `Job` equal to the one ``f`` was made from."""
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], shared_backoff(*f[6]), f[7], f[8], f[9],
                   f[10], f[11], f[12], f[13], f[14], f[15], f[16], f[17], f[18], f[19], f[20],
                   f[21], f[22], f[23], f[24], f[25], tuple([Attempt(*a) for a in f[26]]), f[27])

    @classmethod
    def of(cls, r: spb.JobRecord) -> Job:
        return cls(
            r.job_id, r.queue, r.type, r.payload, r.priority, r.max_attempts,
            Backoff.of(r.backoff), r.timeout_ns, r.retention_ns, r.enqueue_ns, r.run_ns,
            r.state, r.unique_key, r.unique_expire_ns, r.order, r.attempt_count,
            r.lease_losses, r.worker_id, r.lease_token, r.lease_ns, r.lease_expire_ns,
            r.timeout_at_ns, r.finish_ns, r.result, r.last_error, r.schedule_id,
            tuple([Attempt.of(a) for a in r.attempts]))


@dataclass(slots=True, eq=False)
class Schedule:
    """A cron schedule: its stored record, and the last command that changed it."""

    record: spb.ScheduleRecord
    seq: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.record.queue, self.record.schedule_id


Request = tuple[str, int, int]
"""A request id remembered by its queue: ``(job_id, expire_ns, seq)``, the job its
Enqueue made, until when it is kept, and the last command that changed it (0:
read back). A plain tuple: there is one per Enqueue in the retention window, and
the garbage collector does not track tuples of strings and numbers."""

REQUEST_EXPIRE_NS: Final = 1
"""Where a `Request` keeps its ``expire_ns`` (the one field read alone)."""
