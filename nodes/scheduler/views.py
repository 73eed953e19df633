"""The wire forms of jobs and schedules, as clients see them (on the primary's clock)."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from common.tenancy import unscoped
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.scheduler.model import LEASED, WAITING, Attempt, Job, Schedule

__all__ = ["claimed_job", "duration", "job_view", "schedule_view", "shown_state", "timestamp"]

_NS = 1_000_000_000


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    seconds, nanos = divmod(ns, _NS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def duration(ns: int) -> duration_pb2.Duration:
    seconds, nanos = divmod(ns, _NS)
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def shown_state(state: int, run_ns: int, now: int) -> pb.JobState.ValueType:
    """A waiting job is PENDING once its run time has come, SCHEDULED before."""
    if state == WAITING and run_ns > now:
        return pb.JOB_STATE_SCHEDULED
    return state  # type: ignore[return-value]


def claimed_job(job: Job) -> pb.ClaimedJob:
    return pb.ClaimedJob(
        job_id=job.job_id, queue=unscoped(job.queue), type=job.type, payload=job.payload,
        lease_token=job.lease_token, lease_expire_time=timestamp(job.lease_expire_ns),
        attempt=job.attempt_count, max_attempts=job.max_attempts,
        timeout_time=timestamp(job.timeout_at_ns), enqueue_time=timestamp(job.enqueue_ns),
        lease_losses=job.lease_losses, priority=job.priority)


def _backoff(job: Job) -> pb.Backoff:
    b = job.backoff
    return pb.Backoff(initial_delay=duration(b.initial_ns), max_delay=duration(b.max_ns),
                      multiplier=b.multiplier, jitter=b.jitter)


def _attempt(a: Attempt) -> pb.Attempt:
    view = pb.Attempt(number=a.number, worker_id=a.worker_id, start_time=timestamp(a.start_ns),
                      outcome=a.outcome, error=a.error)  # type: ignore[arg-type]
    if a.finish_ns:
        view.finish_time.CopyFrom(timestamp(a.finish_ns))
    return view


def job_view(job: Job, now: int) -> pb.Job:
    view = pb.Job(
        job_id=job.job_id, queue=unscoped(job.queue), type=job.type, payload=job.payload,
        priority=job.priority, state=shown_state(job.state, job.run_ns, now),
        attempt_count=job.attempt_count, max_attempts=job.max_attempts,
        backoff=_backoff(job), timeout=duration(job.timeout_ns), unique_key=job.unique_key,
        enqueue_time=timestamp(job.enqueue_ns), run_time=timestamp(job.run_ns),
        result=job.result, last_error=job.last_error,
        attempts=[_attempt(a) for a in job.attempts], schedule_id=job.schedule_id,
        lease_losses=job.lease_losses, retention=duration(job.retention_ns))
    if job.state == LEASED:
        view.worker_id = job.worker_id
        view.lease_expire_time.CopyFrom(timestamp(job.lease_expire_ns))
    if job.finished:
        view.finish_time.CopyFrom(timestamp(job.finish_ns))
    return view


def _template(r: spb.JobRecord) -> pb.JobTemplate:
    b = r.backoff
    return pb.JobTemplate(
        type=r.type, payload=r.payload, priority=r.priority, max_attempts=r.max_attempts,
        backoff=pb.Backoff(initial_delay=duration(b.initial_ns), max_delay=duration(b.max_ns),
                           multiplier=b.multiplier, jitter=b.jitter),
        timeout=duration(r.timeout_ns), unique_key=r.unique_key,
        unique_ttl=duration(r.unique_ttl_ns), retention=duration(r.retention_ns))


def schedule_view(schedule: Schedule) -> pb.Schedule:
    r = schedule.record
    view = pb.Schedule(
        schedule_id=r.schedule_id, queue=unscoped(r.queue), cron=r.cron, timezone=r.timezone,
        template=_template(r.template), next_fire_time=timestamp(r.next_fire_ns),
        last_job_id=r.last_job_id, create_time=timestamp(r.create_ns),
        fired_total=r.fired_total, skipped_total=r.skipped_total)
    if r.fired_total or r.skipped_total:
        view.last_fire_time.CopyFrom(timestamp(r.last_tick_ns))
    return view
