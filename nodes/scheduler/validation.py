"""Request validation for the scheduler: every failure names the offending field.

`job_spec` also fills in the node's defaults, so that the command carries the
job exactly as every copy will store it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from google.protobuf import duration_pb2

from common.bounds import check_bytes, duration_ns, timestamp_ns
from common.errors import invalid_argument
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.config import SchedulerLimits
from nodes.scheduler import cron

__all__ = ["MAX_CLAIM_JOBS", "MAX_IDS", "check_batch", "check_ids", "check_job_id",
           "check_name", "check_request_id", "check_worker", "claim_next", "claim_queues",
           "cron_spec", "error_text", "job_spec", "lease_ns", "max_jobs", "page_size",
           "wait_ns"]

MAX_NAME_BYTES = 256
MAX_JOB_ID_BYTES = 1024
MAX_REQUEST_ID_BYTES = 128
MAX_ATTEMPTS = 1000
MAX_PRIORITY = 9
MAX_CLAIM_QUEUES = 100
MAX_CLAIM_JOBS = 100
MAX_WAIT_NS = 60 * 1_000_000_000
MAX_ERROR_BYTES = 4096
MAX_IDS = 10_000
MAX_CRON_BYTES = 1024
"""Room for six fields of full lists ("0,1,...,59" is 170 bytes)."""
MAX_TIMEZONE_BYTES = 128
"""IANA names are at most ~32 bytes."""
DEFAULT_PAGE = 50
MAX_PAGE = 1000
_NS = 1_000_000_000
_NAME = re.compile(r"[A-Za-z0-9_\-.:/@#=+{}]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _too_long(text: str, limit: int) -> bool:
    return len(text) * 4 > limit and len(text.encode()) > limit


def check_name(name: str, field: str) -> None:
    """A queue or schedule id: 1-256 bytes of A-Z a-z 0-9 _ - . : / @ # = + { }."""
    if not name:
        raise invalid_argument(field, "must not be empty")
    if len(name) > MAX_NAME_BYTES:
        raise invalid_argument(field, f"must be at most {MAX_NAME_BYTES} bytes")
    if not _NAME.fullmatch(name):
        raise invalid_argument(field, "may hold only A-Z a-z 0-9 and _ - . : / @ # = + { }")


def _check_text(text: str, field: str, required: bool = True) -> None:
    if required and not text:
        raise invalid_argument(field, "must not be empty")
    if _too_long(text, MAX_NAME_BYTES):
        raise invalid_argument(field, f"must be at most {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(text):
        raise invalid_argument(field, "must not hold control characters")


def check_job_id(job_id: str) -> None:
    if not job_id:
        raise invalid_argument("job_id", "must not be empty")
    if _too_long(job_id, MAX_JOB_ID_BYTES):
        raise invalid_argument("job_id", f"must be at most {MAX_JOB_ID_BYTES} bytes")


def check_result(result: bytes, limits: SchedulerLimits) -> None:
    """A Complete's result: at most ``--scheduler-max-payload-bytes``."""
    if len(result) > limits.max_payload_bytes:
        raise invalid_argument("result", f"is {len(result)} bytes; the limit "
                                         f"is {limits.max_payload_bytes}")


def _seconds_ns(seconds: float) -> int:
    return int(seconds * _NS)


def _backoff(source: pb.EnqueueRequest | pb.JobTemplate, limits: SchedulerLimits,
             prefix: str) -> spb.BackoffRecord:
    if not source.HasField("backoff"):
        return spb.BackoffRecord(
            initial_ns=_seconds_ns(limits.backoff_initial),
            max_ns=_seconds_ns(limits.backoff_max),
            multiplier=limits.backoff_multiplier, jitter=limits.backoff_jitter)
    b = source.backoff
    field = f"{prefix}backoff"
    initial = duration_ns(f"{field}.initial_delay", b.initial_delay) \
        or _seconds_ns(limits.backoff_initial)
    given_max = duration_ns(f"{field}.max_delay", b.max_delay)
    if given_max and given_max < initial:
        raise invalid_argument(f"{field}.max_delay", "must be at least initial_delay")
    maximum = given_max or max(_seconds_ns(limits.backoff_max), initial)
    if b.multiplier != 0 and not 1 <= b.multiplier <= 1000:
        raise invalid_argument(f"{field}.multiplier", "must be 0 (the default) or 1 to 1000")
    if not 0 <= b.jitter <= 1:
        raise invalid_argument(f"{field}.jitter", "must be between 0 and 1")
    return spb.BackoffRecord(initial_ns=initial, max_ns=maximum,
                             multiplier=b.multiplier or limits.backoff_multiplier,
                             jitter=b.jitter)


def _template(source: pb.EnqueueRequest | pb.JobTemplate, limits: SchedulerLimits,
              prefix: str) -> spb.JobRecord:
    """The fields a job and a schedule's template share, checked, defaults in."""
    _check_text(source.type, f"{prefix}type")
    if len(source.payload) > limits.max_payload_bytes:
        raise invalid_argument(f"{prefix}payload",
                               f"is {len(source.payload)} bytes; the limit is "
                               f"{limits.max_payload_bytes}")
    if source.priority > MAX_PRIORITY:
        raise invalid_argument(f"{prefix}priority", f"must be 0 to {MAX_PRIORITY}")
    if source.max_attempts > MAX_ATTEMPTS:
        raise invalid_argument(f"{prefix}max_attempts", f"must be at most {MAX_ATTEMPTS}")
    _check_text(source.unique_key, f"{prefix}unique_key", required=False)
    return spb.JobRecord(
        type=source.type, payload=source.payload, priority=source.priority,
        max_attempts=source.max_attempts or limits.default_max_attempts,
        backoff=_backoff(source, limits, prefix),
        timeout_ns=duration_ns(f"{prefix}timeout", source.timeout)
        or _seconds_ns(limits.default_timeout),
        unique_key=source.unique_key,
        unique_ttl_ns=duration_ns(f"{prefix}unique_ttl", source.unique_ttl),
        retention_ns=duration_ns(f"{prefix}retention", source.retention)
        or _seconds_ns(limits.default_retention))


def check_request_id(request_id: str) -> None:
    """An idempotency key: empty (none), or up to 128 bytes without control characters."""
    if _too_long(request_id, MAX_REQUEST_ID_BYTES):
        raise invalid_argument("request_id", f"must be at most {MAX_REQUEST_ID_BYTES} bytes")
    if _CONTROL.search(request_id):
        raise invalid_argument("request_id", "must not hold control characters")


def job_spec(request: pb.EnqueueRequest, limits: SchedulerLimits, now: int) -> spb.JobRecord:
    """The job an Enqueue asks for, as the command carries it (request_id is
    checked too, but travels beside the job)."""
    check_name(request.queue, "queue")
    check_request_id(request.request_id)
    spec = _template(request, limits, "")
    spec.queue = request.queue
    when = request.WhichOneof("when")
    if when == "run_at":
        spec.run_ns = max(timestamp_ns("run_at", request.run_at), now)
    elif when == "delay":
        spec.run_ns = now + duration_ns("delay", request.delay)
    else:
        spec.run_ns = now
    if spec.unique_ttl_ns:
        spec.unique_expire_ns = now + spec.unique_ttl_ns
        spec.unique_ttl_ns = 0
    return spec


def cron_spec(request: pb.CreateScheduleRequest, limits: SchedulerLimits, now: int
              ) -> spb.ScheduleRecord:
    """The schedule a CreateSchedule asks for, with its first tick after ``now``."""
    check_name(request.queue, "queue")
    check_name(request.schedule_id, "schedule_id")
    # Bounded before parsing: the parser's errors quote the expression and the
    # zone name, and neither should cost more than a short look.
    check_bytes("cron", request.cron, MAX_CRON_BYTES)
    check_bytes("timezone", request.timezone, MAX_TIMEZONE_BYTES)
    try:
        expr = cron.parse(request.cron)
    except cron.CronError as exc:
        raise invalid_argument("cron", str(exc)) from None
    try:
        tz = cron.zone(request.timezone)
    except cron.CronError as exc:
        raise invalid_argument("timezone", str(exc)) from None
    template = _template(request.template, limits, "template.")
    template.queue = request.queue
    template.schedule_id = request.schedule_id
    first = expr.next_after(now, tz)
    if first is None:
        raise invalid_argument("cron", "never fires (within 5 years)")
    return spb.ScheduleRecord(
        queue=request.queue, schedule_id=request.schedule_id, cron=request.cron.strip(),
        timezone=request.timezone, template=template, last_tick_ns=now, next_fire_ns=first)


def claim_queues(queues: Sequence[str], field: str = "queues") -> list[str]:
    if not queues:
        raise invalid_argument(field, "must not be empty")
    if len(queues) > MAX_CLAIM_QUEUES:
        raise invalid_argument(field, f"at most {MAX_CLAIM_QUEUES} queues")
    for i, queue in enumerate(queues):
        check_name(queue, f"{field}[{i}]")
    if len(set(queues)) != len(queues):
        raise invalid_argument(field, "must not repeat a queue")
    return list(queues)


def check_worker(worker_id: str, field: str = "worker_id") -> None:
    _check_text(worker_id, field)


def max_jobs(value: int, field: str = "max_jobs") -> int:
    if value > MAX_CLAIM_JOBS:
        raise invalid_argument(field, f"must be at most {MAX_CLAIM_JOBS}")
    return value or 1


def claim_next(next_: pb.ClaimNext, limits: SchedulerLimits
               ) -> tuple[list[str], str, int, int]:
    """A Complete's or Fail's ``next``: (queues, worker_id, max_jobs, lease_ns)."""
    queues = claim_queues(next_.queues, "next.queues")
    check_worker(next_.worker_id, "next.worker_id")
    most = max_jobs(next_.max_jobs, "next.max_jobs")
    lease = lease_ns(next_.lease_duration, limits, "next.lease_duration") \
        or _seconds_ns(limits.default_lease)
    return queues, next_.worker_id, most, lease


def check_batch(count: int, field: str, limit: int) -> None:
    """A batch call's items: 1 to ``limit``."""
    if not count:
        raise invalid_argument(field, "must not be empty")
    if count > limit:
        raise invalid_argument(field, f"has {count} items; the limit is {limit}")


def lease_ns(d: duration_pb2.Duration, limits: SchedulerLimits, field: str) -> int | None:
    """A lease length within the node's bounds; None if unset or zero."""
    ns = duration_ns(field, d)
    if not ns:
        return None
    if not _seconds_ns(limits.min_lease) <= ns <= _seconds_ns(limits.max_lease):
        raise invalid_argument(field, f"must be {limits.min_lease:g} s to "
                                      f"{limits.max_lease:g} s")
    return ns


def wait_ns(d: duration_pb2.Duration) -> int:
    ns = duration_ns("wait", d)
    if ns > MAX_WAIT_NS:
        raise invalid_argument("wait", "must be at most 60 s")
    return ns


def error_text(error: str) -> str:
    """A Fail's error, cut to 4 KiB of UTF-8."""
    if len(error) * 4 <= MAX_ERROR_BYTES:
        return error
    return error.encode()[:MAX_ERROR_BYTES].decode(errors="ignore")


def check_ids(job_ids: Sequence[str]) -> None:
    if len(job_ids) > MAX_IDS:
        raise invalid_argument("job_ids", f"at most {MAX_IDS} ids per call")
    for i, job_id in enumerate(job_ids):
        check_bytes(f"job_ids[{i}]", job_id, MAX_JOB_ID_BYTES)


def page_size(value: int) -> int:
    return DEFAULT_PAGE if value == 0 else min(value, MAX_PAGE)
