"""The scheduler's refusals (`ServiceError`), with the reasons scheduler.proto documents."""

from __future__ import annotations

from common.errors import Reason, ServiceError
from common.tenancy import unscoped
from mesh.scheduler.v1 import scheduler_pb2 as pb
from nodes.scheduler.model import Job

__all__ = ["duplicate_job", "job_not_found", "lease_lost", "primary_lost", "queue_full",
           "schedule_exists", "shutting_down"]


def job_not_found(job_id: str) -> ServiceError:
    return ServiceError(
        f"job {job_id!r} is unknown (never enqueued, purged, or past its retention)",
        Reason.JOB_NOT_FOUND, {"job_id": job_id})


def lease_lost(job: Job) -> ServiceError:
    state = pb.JobState.Name(job.state)  # type: ignore[arg-type]
    return ServiceError(
        f"job {job.job_id!r}: that lease token is not its current lease (the lease "
        f"expired, or the job was claimed again or cancelled; it is {state} now): "
        "stop working on it", Reason.LEASE_LOST, {"job_id": job.job_id, "state": state})


def duplicate_job(queue: str, unique_key: str, holder: str) -> ServiceError:
    return ServiceError(
        f"queue {unscoped(queue)!r}: unique key {unique_key!r} is held by job {holder!r}",
        Reason.DUPLICATE_JOB, {"job_id": holder, "unique_key": unique_key})


def queue_full(queue: str, limit: int) -> ServiceError:
    return ServiceError(
        f"queue {unscoped(queue)!r} already holds {limit} unfinished jobs (the node's limit); "
        "back off", Reason.QUEUE_FULL, {"queue": unscoped(queue), "limit": str(limit)})


def schedule_exists(queue: str, schedule_id: str) -> ServiceError:
    return ServiceError(
        f"queue {unscoped(queue)!r} already has a schedule {schedule_id!r} "
        "(set replace to replace it)",
        Reason.SCHEDULE_EXISTS, {"queue": unscoped(queue), "schedule_id": schedule_id})


def primary_lost(group_id: int) -> ServiceError:
    return ServiceError(
        f"group {group_id} is no longer led by this node; claim again (at its new primary)",
        Reason.GROUP_UNAVAILABLE, {"group_id": str(group_id)})


def shutting_down() -> ServiceError:
    return ServiceError(
        "the node is shutting down; claim again elsewhere",
        Reason.SHUTTING_DOWN)
