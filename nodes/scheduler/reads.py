"""The scheduler's reads (part of `SchedulerService`): GetJob, Stats and the lists.

Reads show committed state only: each reads, then waits until what it read is
committed (GetJob the latest command that changed the job; Stats and the lists
everything the primary did before they read, as lock Describe does), so a read
never reports a change a failover could still undo, nor one made while it
waited.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias, TypeVar, cast

import grpc

from common import pagetoken, tenancy
from common.tenancy import scoped
from mesh.scheduler.v1 import scheduler_pb2 as pb
from nodes.pages import within_page
from nodes.replication.group import Group
from nodes.routing import Routed, routed
from nodes.scheduler import errors
from nodes.scheduler import validation as v
from nodes.scheduler.machine import SCHEDULER, SchedulerMachine
from nodes.scheduler.views import job_view, schedule_view, timestamp

if TYPE_CHECKING:
    from common.clock import Clock

__all__ = ["Reads"]

Ctx: TypeAlias = grpc.aio.ServicerContext

def _machine(group: Group) -> SchedulerMachine:
    return cast(SchedulerMachine, group.machines[SCHEDULER])


def own(group: Group, job_id: str) -> None:
    """Refuse a job of another tenant's queue as if it did not exist."""
    job = _machine(group).state.jobs.get(job_id)
    if job is not None and not tenancy.visible(job.queue):
        raise errors.job_not_found(job_id)


_DEAD_LETTERS = "scheduler.ListDeadLetters"
_SCHEDULES = "scheduler.ListSchedules"


_QueueRequest: TypeAlias = pb.StatsRequest | pb.ListDeadLettersRequest | pb.ListSchedulesRequest
_Answer = TypeVar("_Answer", pb.StatsResponse, pb.ListDeadLettersResponse,
                  pb.ListSchedulesResponse)


def _page_after(token: str) -> tuple[int, str] | None:
    """The (finish_ns, job_id) a ListDeadLetters page ended at; None for page one."""
    after = pagetoken.decode(token, _DEAD_LETTERS, (int, str))
    return None if after is None else (after[0], after[1])


class Reads(Routed):
    """Read RPCs; mixed into `SchedulerService`."""

    clock: Clock

    @routed("job_id")
    async def GetJob(self, request: pb.GetJobRequest, context: Ctx,
                     group: Group) -> pb.GetJobResponse:
        v.check_job_id(request.job_id)
        own(group, request.job_id)
        job = _machine(group).decisions.job(request.job_id)
        answer = pb.GetJobResponse(job=job_view(job, self.clock.wall_ns()))
        await group.wait_committed(job.seq)  # the job as read, committed
        return answer

    @staticmethod
    def _queue_machine(group: Group, request: _QueueRequest) -> SchedulerMachine:
        """The machine holding the request's queue (the caller reads it, then
        waits for what it read to be committed: `_committed`)."""
        v.check_name(request.queue, "queue")
        request.queue = scoped(request.queue)  # served here: the caller's tenant's queue
        return _machine(group)

    @staticmethod
    async def _committed(group: Group, answer: _Answer) -> _Answer:
        """``answer`` once everything the primary did before it was read is
        committed: read first, so that nothing decided during the wait (and not
        yet committed) is in it."""
        await group.wait_committed(group.log.last_seq)
        return answer

    @routed("queue")
    async def Stats(self, request: pb.StatsRequest, context: Ctx,
                    group: Group) -> pb.StatsResponse:
        machine = self._queue_machine(group, request)
        schedules = sum(1 for queue, _ in machine.state.schedules if queue == request.queue)
        queue = machine.state.queues.get(request.queue)
        if queue is None:
            return await self._committed(group, pb.StatsResponse(schedules=schedules))
        queue.promote(self.clock.wall_ns())
        response = pb.StatsResponse(
            ready=queue.n_ready, delayed=queue.n_delayed, leased=len(queue.leased),
            done=queue.n_done, dead=len(queue.dead), cancelled=queue.n_cancelled,
            succeeded_total=queue.totals.succeeded,
            failed_attempts_total=queue.totals.failed_attempts,
            lease_losses_total=queue.totals.lease_losses, schedules=schedules)
        oldest = queue.oldest_ready()
        if oldest is not None:
            response.oldest_ready_time.CopyFrom(timestamp(oldest))
        return await self._committed(group, response)

    @routed("queue")
    async def ListDeadLetters(self, request: pb.ListDeadLettersRequest, context: Ctx,
                              group: Group) -> pb.ListDeadLettersResponse:
        after = _page_after(request.page_token)
        size = v.page_size(request.page_size)
        machine = self._queue_machine(group, request)
        queue = machine.state.queues.get(request.queue)
        if queue is None:
            return await self._committed(group, pb.ListDeadLettersResponse())
        ids = queue.dead_after(after, size + 1)
        now = self.clock.wall_ns()
        jobs = [machine.state.jobs[i] for i in ids[:size]]
        views = within_page([job_view(j, now) for j in jobs])
        response = pb.ListDeadLettersResponse(jobs=views, total=len(queue.dead))
        if len(ids) > len(views):
            last = jobs[len(views) - 1]
            response.next_page_token = pagetoken.encode(_DEAD_LETTERS, last.finish_ns,
                                                        last.job_id)
        return await self._committed(group, response)

    @routed("queue")
    async def ListSchedules(self, request: pb.ListSchedulesRequest, context: Ctx,
                            group: Group) -> pb.ListSchedulesResponse:
        after = pagetoken.decode(request.page_token, _SCHEDULES, (str,))
        after_id: str = "" if after is None else after[0]
        size = v.page_size(request.page_size)
        machine = self._queue_machine(group, request)
        found = sorted((sid, s) for (queue, sid), s in machine.state.schedules.items()
                       if queue == request.queue and sid > after_id)
        views = within_page([schedule_view(s) for _, s in found[:size]])
        response = pb.ListSchedulesResponse(schedules=views)
        if len(found) > len(views):
            response.next_page_token = pagetoken.encode(_SCHEDULES, found[len(views) - 1][0])
        return await self._committed(group, response)
