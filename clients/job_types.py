"""The values the scheduler client takes and returns, and their wire forms.

Times are Unix seconds on the primary's clock; durations are seconds. A field
the node did not set (no run yet, no lease) reads as ``None``.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clients.durations import duration, timestamp
from clients.errors import InvalidArgumentError
from clients.requests import build
from mesh.scheduler.v1 import scheduler_pb2 as pb

Payload = bytes | str | Mapping[str, Any] | list[Any]
"""A job payload or result: bytes as they are, str as UTF-8, a mapping or list as JSON."""


def encode(payload: Payload | None) -> bytes:
    """The bytes of a payload or result (None: empty)."""
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload, separators=(",", ":")).encode()


def _time(message: Any, name: str) -> float | None:
    if not message.HasField(name):
        return None
    ts = getattr(message, name)
    return float(ts.seconds + ts.nanos / 1e9)


def _span(message: Any, name: str) -> float | None:
    if not message.HasField(name):
        return None
    return float(getattr(message, name).ToNanoseconds() / 1e9)


class JobState(enum.Enum):
    """Where a job is in its life."""

    UNSPECIFIED = pb.JOB_STATE_UNSPECIFIED
    PENDING = pb.JOB_STATE_PENDING
    """Ready: waiting to be claimed."""
    SCHEDULED = pb.JOB_STATE_SCHEDULED
    """Waiting for its run time (first run, or a retry after backoff)."""
    LEASED = pb.JOB_STATE_LEASED
    """Claimed by a worker, under a lease."""
    SUCCEEDED = pb.JOB_STATE_SUCCEEDED
    DEAD = pb.JOB_STATE_DEAD
    """Failed for good: in the dead letters until requeued or purged."""
    CANCELLED = pb.JOB_STATE_CANCELLED

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED)

    @classmethod
    def parse(cls, value: int | str) -> JobState:
        """From the proto number, or a name such as ``"DEAD"`` or ``"JOB_STATE_DEAD"``."""
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                return cls.UNSPECIFIED
        name = value.upper().removeprefix("JOB_STATE_")
        return cls.__members__.get(name, cls.UNSPECIFIED)


class AttemptOutcome(enum.Enum):
    """How one attempt ended."""

    UNSPECIFIED = pb.ATTEMPT_OUTCOME_UNSPECIFIED
    RUNNING = pb.ATTEMPT_OUTCOME_RUNNING
    SUCCEEDED = pb.ATTEMPT_OUTCOME_SUCCEEDED
    FAILED = pb.ATTEMPT_OUTCOME_FAILED
    LEASE_EXPIRED = pb.ATTEMPT_OUTCOME_LEASE_EXPIRED
    """The worker crashed or stalled; not counted against max_attempts."""
    TIMED_OUT = pb.ATTEMPT_OUTCOME_TIMED_OUT
    CANCELLED = pb.ATTEMPT_OUTCOME_CANCELLED
    ABANDONED = pb.ATTEMPT_OUTCOME_ABANDONED
    """The Claim that leased it was cancelled before it was answered."""

    @classmethod
    def of(cls, value: int) -> AttemptOutcome:
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class JobBackoff:
    """Retry delays: after the n-th failure ``min(maximum, initial * multiplier**(n-1))``,
    less a random fraction up to ``jitter``. Zero fields take the node's defaults
    (1 s, 1 h, 2); jitter 0 means exact delays."""

    initial: float = 0.0
    maximum: float = 0.0
    multiplier: float = 0.0
    jitter: float = 0.0

    def to_proto(self, field: str = "backoff") -> pb.Backoff:
        """The wire form; ``field``: where it goes in the request (for errors)."""
        b = pb.Backoff(multiplier=self.multiplier, jitter=self.jitter)
        if self.initial:
            b.initial_delay.CopyFrom(duration(self.initial, f"{field}.initial_delay"))
        if self.maximum:
            b.max_delay.CopyFrom(duration(self.maximum, f"{field}.max_delay"))
        return b

    @classmethod
    def from_proto(cls, b: pb.Backoff) -> JobBackoff:
        return cls(_span(b, "initial_delay") or 0.0, _span(b, "max_delay") or 0.0,
                   b.multiplier, b.jitter)


@dataclass(frozen=True, slots=True)
class NewJob:
    """One job to enqueue (``SchedulerClient.enqueue_many``); the fields mean what
    ``enqueue_result``'s arguments mean. ``request_id`` empty: a fresh UUID."""

    queue: str
    type: str
    payload: Payload = b""
    priority: int = 0
    run_at: float | dt.datetime | None = None
    delay: float | None = None
    max_attempts: int = 0
    backoff: JobBackoff | None = None
    job_timeout: float | None = None
    unique_key: str = ""
    unique_ttl: float | None = None
    strict_unique: bool = False
    retention: float | None = None
    request_id: str = ""

    def to_proto(self) -> pb.EnqueueRequest:
        if self.run_at is not None and self.delay is not None:
            raise InvalidArgumentError("give run_at or delay, not both",
                                       field_violations={"when": "both run_at and delay"})
        request = build(pb.EnqueueRequest)(
            queue=self.queue, type=self.type, payload=encode(self.payload),
            priority=self.priority, max_attempts=self.max_attempts, unique_key=self.unique_key,
            strict_unique=self.strict_unique, request_id=self.request_id or str(uuid.uuid4()))
        if self.run_at is not None:
            request.run_at.CopyFrom(timestamp(_unix(self.run_at), "run_at"))
        elif self.delay is not None:
            request.delay.CopyFrom(duration(self.delay, "delay"))
        if self.backoff is not None:
            request.backoff.CopyFrom(self.backoff.to_proto())
        if self.job_timeout:
            request.timeout.CopyFrom(duration(self.job_timeout, "timeout"))
        if self.unique_ttl:
            request.unique_ttl.CopyFrom(duration(self.unique_ttl, "unique_ttl"))
        if self.retention:
            request.retention.CopyFrom(duration(self.retention, "retention"))
        return request


def _unix(when: float | dt.datetime) -> float:
    if isinstance(when, dt.datetime):
        if when.tzinfo is None:
            raise InvalidArgumentError("run_at: a datetime needs a time zone",
                                       field_violations={"run_at": "naive datetime"})
        return when.timestamp()
    if isinstance(when, bool) or not isinstance(when, int | float):
        raise TypeError(f"run_at: an aware datetime or Unix seconds, not {type(when).__name__}")
    return when


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """What Enqueue did: the job id (the holder's, when ``duplicate``)."""

    job_id: str
    duplicate: bool
    """The unique key was held: nothing was enqueued."""
    state: JobState
    """UNSPECIFIED when ``replayed`` and the job is no longer kept."""
    run_time: float | None
    replayed: bool = False
    """The request id had already made this job (an earlier try of this call, or
    another call with the same id): nothing was enqueued."""


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job leased to a worker. ``lease_token`` is the fencing token Heartbeat,
    Complete and Fail need; pass it to the systems the job writes to as well."""

    job_id: str
    queue: str
    type: str
    payload: bytes
    lease_token: int
    attempt: int
    """1 for the first; ``attempt == max_attempts`` is the last chance."""
    max_attempts: int
    priority: int
    lease_losses: int
    lease_expire_time: float | None
    timeout_time: float | None
    enqueue_time: float | None
    lease_duration: float = 30.0
    """The lease length asked for (seconds)."""

    @property
    def last_attempt(self) -> bool:
        return self.max_attempts > 0 and self.attempt >= self.max_attempts

    def json(self) -> Any:
        """The payload decoded as JSON."""
        return json.loads(self.payload)

    @classmethod
    def from_proto(cls, j: pb.ClaimedJob, lease_duration: float) -> ClaimedJob:
        return cls(j.job_id, j.queue, j.type, j.payload, j.lease_token, j.attempt,
                   j.max_attempts, j.priority, j.lease_losses, _time(j, "lease_expire_time"),
                   _time(j, "timeout_time"), _time(j, "enqueue_time"), lease_duration)


@dataclass(frozen=True, slots=True)
class FailResult:
    """What happens after a failed attempt: SCHEDULED (retry later), PENDING (retry
    now) or DEAD."""

    state: JobState
    next_run_time: float | None
    attempts: int


@dataclass(frozen=True, slots=True)
class CancelResult:
    """``cancelled``: the job was stopped; False if it had already finished."""

    cancelled: bool
    state: JobState


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt at running a job (``finish_time`` None while running)."""

    number: int
    worker_id: str
    start_time: float | None
    finish_time: float | None
    outcome: AttemptOutcome
    error: str

    @property
    def duration(self) -> float | None:
        if self.start_time is None or self.finish_time is None:
            return None
        return self.finish_time - self.start_time

    @classmethod
    def from_proto(cls, a: pb.Attempt) -> Attempt:
        return cls(a.number, a.worker_id, _time(a, "start_time"), _time(a, "finish_time"),
                   AttemptOutcome.of(a.outcome), a.error)


@dataclass(frozen=True, slots=True)
class Job:
    """A job as stored, with its most recent attempts (oldest first)."""

    job_id: str
    queue: str
    type: str
    payload: bytes
    priority: int
    state: JobState
    attempt_count: int
    max_attempts: int
    backoff: JobBackoff
    timeout: float | None
    unique_key: str
    enqueue_time: float | None
    run_time: float | None
    worker_id: str
    lease_expire_time: float | None
    finish_time: float | None
    result: bytes
    last_error: str
    attempts: list[Attempt]
    schedule_id: str
    lease_losses: int
    retention: float | None

    def json(self) -> Any:
        """The payload decoded as JSON."""
        return json.loads(self.payload)

    @classmethod
    def from_proto(cls, j: pb.Job) -> Job:
        return cls(
            j.job_id, j.queue, j.type, j.payload, j.priority, JobState.parse(j.state),
            j.attempt_count, j.max_attempts, JobBackoff.from_proto(j.backoff),
            _span(j, "timeout"), j.unique_key, _time(j, "enqueue_time"), _time(j, "run_time"),
            j.worker_id, _time(j, "lease_expire_time"), _time(j, "finish_time"), j.result,
            j.last_error, [Attempt.from_proto(a) for a in j.attempts], j.schedule_id,
            j.lease_losses, _span(j, "retention"))


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """One page of a queue's dead jobs, oldest death first."""

    jobs: list[Job]
    next_page_token: str
    """Empty on the last page."""
    total: int
    """Dead jobs in the queue in all."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A queue's jobs by state, and its lifetime counters."""

    queue: str
    ready: int
    delayed: int
    leased: int
    done: int
    dead: int
    cancelled: int
    oldest_ready_time: float | None
    succeeded_total: int
    failed_attempts_total: int
    lease_losses_total: int
    schedules: int

    @classmethod
    def from_proto(cls, queue: str, s: pb.StatsResponse) -> QueueStats:
        return cls(queue, s.ready, s.delayed, s.leased, s.done, s.dead, s.cancelled,
                   _time(s, "oldest_ready_time"), s.succeeded_total, s.failed_attempts_total,
                   s.lease_losses_total, s.schedules)


@dataclass(frozen=True, slots=True)
class JobTemplate:
    """What a cron schedule enqueues at each firing (fields as in ``enqueue``)."""

    type: str
    payload: Payload = b""
    priority: int = 0
    max_attempts: int = 0
    backoff: JobBackoff | None = None
    timeout: float | None = None
    unique_key: str = ""
    """If set, a firing while the previous job with this key is unfinished is skipped."""
    unique_ttl: float | None = None
    retention: float | None = None

    def to_proto(self) -> pb.JobTemplate:
        t = build(pb.JobTemplate)(
            type=self.type, payload=encode(self.payload), priority=self.priority,
            max_attempts=self.max_attempts, unique_key=self.unique_key)
        if self.backoff is not None:
            t.backoff.CopyFrom(self.backoff.to_proto("template.backoff"))
        if self.timeout:
            t.timeout.CopyFrom(duration(self.timeout, "template.timeout"))
        if self.unique_ttl:
            t.unique_ttl.CopyFrom(duration(self.unique_ttl, "template.unique_ttl"))
        if self.retention:
            t.retention.CopyFrom(duration(self.retention, "template.retention"))
        return t

    @classmethod
    def from_proto(cls, t: pb.JobTemplate) -> JobTemplate:
        return cls(t.type, t.payload, t.priority, t.max_attempts,
                   JobBackoff.from_proto(t.backoff) if t.HasField("backoff") else None,
                   _span(t, "timeout"), t.unique_key, _span(t, "unique_ttl"),
                   _span(t, "retention"))


@dataclass(frozen=True, slots=True)
class Schedule:
    """A cron schedule of a queue."""

    schedule_id: str
    queue: str
    cron: str
    timezone: str
    template: JobTemplate
    next_fire_time: float | None
    last_fire_time: float | None
    last_job_id: str
    create_time: float | None
    fired_total: int
    skipped_total: int

    @classmethod
    def from_proto(cls, s: pb.Schedule) -> Schedule:
        return cls(s.schedule_id, s.queue, s.cron, s.timezone,
                   JobTemplate.from_proto(s.template), _time(s, "next_fire_time"),
                   _time(s, "last_fire_time"), s.last_job_id, _time(s, "create_time"),
                   s.fired_total, s.skipped_total)


@dataclass(frozen=True, slots=True)
class SchedulePage:
    """One page of a queue's schedules, by id."""

    schedules: list[Schedule] = field(default_factory=list)
    next_page_token: str = ""
