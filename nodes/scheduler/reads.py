"""The scheduler's reads (part of `SchedulerService`): GetJob, Stats and the lists.

Reads show committed state only. GetJob waits until the latest command that
changed the job is committed; Stats and the lists wait until everything the
primary did before the call is committed (as lock Describe does): a read never
reports a change a failover could still undo.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc

from common import pagetoken, tenancy
from common.tenancy import scoped
from mesh.scheduler.v1 import scheduler_pb2 as pb
from nodes.replication.group import Group
from nodes.replication.manager import Redirect
from nodes.scheduler import errors
from nodes.scheduler import validation as v
from nodes.scheduler.machine import SCHEDULER, SchedulerMachine
from nodes.scheduler.model import Job
from nodes.scheduler.views import job_view, schedule_view, timestamp

__all__ = ["Reads"]

Ctx: TypeAlias = grpc.aio.ServicerContext

_SETTLE_TRIES = 3


def _machine(group: Group) -> SchedulerMachine:
    return cast(SchedulerMachine, group.machines[SCHEDULER])


def own(group: Group, job_id: str) -> None:
    """Refuse a job of another tenant's queue as if it did not exist."""
    job = _machine(group).state.jobs.get(job_id)
    if job is not None and not tenancy.visible(job.queue):
        raise errors.job_not_found(job_id)


async def _settled_job(group: Group, job_id: str) -> Job:
    """The job once its latest change is committed (a few tries under constant
    change; then as it is)."""
    machine = _machine(group)
    job = machine.job(job_id)
    for _ in range(_SETTLE_TRIES):
        if job.seq <= group.commit_seq:
            break
        await group.wait_committed(job.seq)
        job = machine.job(job_id)
    return job


_DEAD_LETTERS = "scheduler.ListDeadLetters"
_SCHEDULES = "scheduler.ListSchedules"


def _page_after(token: str) -> tuple[int, str] | None:
    """The (finish_ns, job_id) a ListDeadLetters page ended at; None for page one."""
    after = pagetoken.decode(token, _DEAD_LETTERS, (int, str))
    return None if after is None else (after[0], after[1])


class Reads:
    """Read RPCs; mixed into `SchedulerService`."""

    if TYPE_CHECKING:
        def route(self, key: str, context: Ctx) -> Group | Redirect: ...

        async def forward(self, target: Redirect, method: str, request: Any, context: Ctx
                          ) -> Any: ...

    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.GetJobResponse:
        v.check_job_id(request.job_id)
        target = self.route(request.job_id, context)
        if isinstance(target, Redirect):
            return cast(pb.GetJobResponse,
                        await self.forward(target, "GetJob", request, context))
        own(target, request.job_id)
        job = await _settled_job(target, request.job_id)
        return pb.GetJobResponse(job=job_view(job, time.time_ns()))

    async def _queue_target(self, queue: str, method: str, request: Any, context: Ctx
                            ) -> tuple[SchedulerMachine | None, Any]:
        """The queue's machine once the primary's changes so far are committed, or
        the forwarded answer."""
        v.check_name(queue, "queue")
        target = self.route(queue, context)
        if isinstance(target, Redirect):
            return None, await self.forward(target, method, request, context)
        await target.wait_committed(target.log.last_seq)
        request.queue = scoped(queue)  # served here: the caller's tenant's queue
        return _machine(target), None

    async def Stats(self, request: pb.StatsRequest, context: Ctx) -> pb.StatsResponse:
        machine, forwarded = await self._queue_target(request.queue, "Stats", request,
                                                      context)
        if machine is None:
            return cast(pb.StatsResponse, forwarded)
        schedules = sum(1 for queue, _ in machine.state.schedules if queue == request.queue)
        queue = machine.state.queues.get(request.queue)
        if queue is None:
            return pb.StatsResponse(schedules=schedules)
        queue.promote(time.time_ns())
        response = pb.StatsResponse(
            ready=queue.n_ready, delayed=queue.n_delayed, leased=len(queue.leased),
            done=queue.n_done, dead=len(queue.dead), cancelled=queue.n_cancelled,
            succeeded_total=queue.totals.succeeded,
            failed_attempts_total=queue.totals.failed_attempts,
            lease_losses_total=queue.totals.lease_losses, schedules=schedules)
        oldest = queue.oldest_ready()
        if oldest is not None:
            response.oldest_ready_time.CopyFrom(timestamp(oldest))
        return response

    async def ListDeadLetters(self, request: pb.ListDeadLettersRequest, context: Ctx
                              ) -> pb.ListDeadLettersResponse:
        after = _page_after(request.page_token)  # checked here, before forwarding
        size = v.page_size(request.page_size)
        machine, forwarded = await self._queue_target(request.queue, "ListDeadLetters",
                                                      request, context)
        if machine is None:
            return cast(pb.ListDeadLettersResponse, forwarded)
        queue = machine.state.queues.get(request.queue)
        if queue is None:
            return pb.ListDeadLettersResponse()
        ids = queue.dead_after(after, size + 1)
        now = time.time_ns()
        jobs = [machine.state.jobs[i] for i in ids[:size]]
        response = pb.ListDeadLettersResponse(jobs=[job_view(j, now) for j in jobs],
                                              total=len(queue.dead))
        if len(ids) > size:
            last = jobs[-1]
            response.next_page_token = pagetoken.encode(_DEAD_LETTERS, last.finish_ns,
                                                        last.job_id)
        return response

    async def ListSchedules(self, request: pb.ListSchedulesRequest, context: Ctx
                            ) -> pb.ListSchedulesResponse:
        after = pagetoken.decode(request.page_token, _SCHEDULES, (str,))
        after_id: str = "" if after is None else after[0]
        size = v.page_size(request.page_size)
        machine, forwarded = await self._queue_target(request.queue, "ListSchedules",
                                                      request, context)
        if machine is None:
            return cast(pb.ListSchedulesResponse, forwarded)
        found = sorted((sid, s) for (queue, sid), s in machine.state.schedules.items()
                       if queue == request.queue and sid > after_id)
        response = pb.ListSchedulesResponse(
            schedules=[schedule_view(s) for _, s in found[:size]])
        if len(found) > size:
            response.next_page_token = pagetoken.encode(_SCHEDULES, found[size - 1][0])
        return response
