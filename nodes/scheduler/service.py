"""The gRPC face of the scheduler: validation, routing to the queue's group, commit
before answering.

A queue lives in the group that owns its name's slot, and a job id carries a
hash tag of that slot, so every call routes with the ordinary slot function;
only the group's primary serves it, and requests for slots led elsewhere are
forwarded or redirected (nodes/forwarding.py). Every change is answered once
committed (on the primary's disk and acknowledged by every in-sync replica
after theirs). Reads are in `nodes.scheduler.reads`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeAlias, cast

import grpc

from common.bounds import duration_ns
from common.clock import SYSTEM_CLOCK, Clock, from_seconds
from common.errors import MeshStatusError, ServiceError, invalid_argument
from common.metrics import Snapshot, one
from common.slots import slot_for
from common.tenancy import scoped
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.batches import MAX_BATCH, REFUSALS, Waits, answer_all, item_error, route_items, settle
from nodes.config import NodeConfig, SchedulerLimits
from nodes.forwarding import Forwarder, wrong_owner
from nodes.plugin import needs_journal
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.replication.machine import ServiceKind
from nodes.replication.manager import Redirect, Replication
from nodes.routing import routed
from nodes.scheduler import errors
from nodes.scheduler import validation as v
from nodes.scheduler.claims import Claimed, ClaimWaiter, Room, claim
from nodes.scheduler.decisions import Enqueued, Next
from nodes.scheduler.machine import SCHEDULER, SchedulerMachine
from nodes.scheduler.model import DEAD
from nodes.scheduler.reads import Reads, own
from nodes.scheduler.storage import SCHEMA, TABLES
from nodes.scheduler.views import claimed_job, schedule_view, shown_state, timestamp

__all__ = ["SchedulerService"]

log = logging.getLogger(__name__)

Ctx: TypeAlias = grpc.aio.ServicerContext

# Answer an empty Claim this long before the call's own deadline, so the worker
# gets a definite answer rather than DEADLINE_EXCEEDED.
_DEADLINE_MARGIN_NS = 100_000_000
_SWEEP_BATCHES = 10
"""Removal commands (of up to 10,000 jobs each) per group per sweep."""


def machine_of(group: Group) -> SchedulerMachine:
    return cast(SchedulerMachine, group.machines[SCHEDULER])


def _enqueued(result: Enqueued, now: int) -> pb.EnqueueResponse:
    response = pb.EnqueueResponse(job_id=result.job_id, duplicate=result.duplicate,
                                  replayed=result.replayed)
    job = result.job
    if job is not None:
        response.state = shown_state(job.state, job.run_ns, now)
        response.run_time.CopyFrom(timestamp(job.run_ns))
    return response


async def _committed(claimed: list[Claimed]) -> list[pb.ClaimedJob]:
    """The claimed jobs' views, once their leases are committed; a call that goes
    away first puts them back."""
    # The views now, while the jobs are in this lease.
    jobs = [claimed_job(job) for c in claimed for job in c.jobs]
    try:
        for c in claimed:
            await c.machine.group.wait_committed(c.seq)
    except asyncio.CancelledError:
        for c in claimed:
            c.machine.decisions.abandon(c)
        raise
    return jobs


class SchedulerService(Reads, pb_grpc.SchedulerServiceServicer):
    """SchedulerService over one `SchedulerMachine` per replica group."""

    name: ClassVar[str] = "scheduler"
    kind: ClassVar[ServiceKind] = SCHEDULER
    durable: ClassVar[bool] = True
    descriptor = pb.DESCRIPTOR.services_by_name["SchedulerService"]

    def __init__(self, limits: SchedulerLimits, journal: Journal,
                 clock: Clock = SYSTEM_CLOCK, max_message_bytes: int = 32 << 20) -> None:
        """``max_message_bytes``: the node's message limit (claimed jobs stay within it)."""
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self._journal = journal
        journal.create_tables(SCHEMA, TABLES)
        self._replication: Replication | None = None

    @classmethod
    def create(cls, config: NodeConfig, journal: Journal | None,
               clock: Clock = SYSTEM_CLOCK) -> SchedulerService:
        return cls(config.scheduler, needs_journal(journal, cls.name), clock,
                   config.max_message_bytes)

    def machine(self, group: Group) -> SchedulerMachine:
        """The scheduler state machine for a group (the replication layer's factory)."""
        return SchedulerMachine(group, self._journal, self.limits, self.clock)

    # -- lifecycle ---------------------------------------------------------------

    def start(self, replication: Replication, forwarder: Forwarder) -> None:
        self._replication = replication
        self.start_routing(forwarder)

    async def close(self) -> None:
        """End waiting Claims (the node is stopping)."""
        for group in self._replication.groups.values() if self._replication else ():
            machine = group.machines.get(SCHEDULER)
            leader = cast(SchedulerMachine, machine).leader if machine else None
            if leader is not None:
                leader.end_waiters(errors.shutting_down())

    def metrics(self, replication: Replication) -> Snapshot:
        jobs = {"ready": 0, "delayed": 0, "leased": 0, "dead": 0}
        totals = {"succeeded": 0, "failed_attempts": 0, "lease_losses": 0}
        for machine in replication.led(SCHEDULER):
            for queue in cast(SchedulerMachine, machine).state.queues.values():
                jobs["ready"] += queue.n_ready
                jobs["delayed"] += queue.n_delayed
                jobs["leased"] += len(queue.leased)
                jobs["dead"] += len(queue.dead)
                for name in totals:
                    totals[name] += getattr(queue.totals, name)
        return Snapshot(
            gauges={"mesh_scheduler_jobs": (
                "Jobs of the queues in led groups, by state (queue depths)",
                {(("state", k),): float(n) for k, n in jobs.items()})},
            counters={f"mesh_scheduler_{name}": (
                f"Scheduler {name.replace('_', ' ')} in led groups", one(n))
                for name, n in totals.items()},
        )

    @property
    def tick_interval_ns(self) -> int:
        return from_seconds(self.limits.sweep_interval)

    def tick(self, group: Group, now_ns: int) -> int | None:
        # Finished jobs past retention go with a replicated command, like any
        # change, proposed by each primary now and then.
        leader = machine_of(group).leader
        if leader is not None:
            for _ in range(_SWEEP_BATCHES):
                if not leader.sweep(now_ns):
                    break
            for _ in range(_SWEEP_BATCHES):
                if not leader.forget(now_ns):
                    break
        return None

    # -- jobs ------------------------------------------------------------------------

    @routed("queue")
    async def Enqueue(self, request: pb.EnqueueRequest, context: Ctx,
                      group: Group) -> pb.EnqueueResponse:
        now = self.clock.wall_ns()
        spec = v.job_spec(request, self.limits, now)
        spec.queue = scoped(spec.queue)
        result = machine_of(group).decisions.enqueue(spec, request.strict_unique, now,
                                                     request.request_id)
        response = _enqueued(result, now)
        await group.wait_committed(result.seq)
        return response

    async def EnqueueBatch(self, request: pb.EnqueueBatchRequest, context: Ctx
                           ) -> pb.EnqueueBatchResponse:
        jobs = request.jobs
        v.check_batch(len(jobs), "jobs", MAX_BATCH)
        now = self.clock.wall_ns()
        errors_: dict[int, pb.ItemError] = {}
        specs: list[spb.JobRecord | None] = []
        for i, job in enumerate(jobs):
            try:
                specs.append(v.job_spec(job, self.limits, now))
            except MeshStatusError as exc:
                errors_[i] = item_error(exc, f"jobs[{i}].")
                specs.append(None)
        routes = route_items([jobs[i].queue if spec is not None else None
                              for i, spec in enumerate(specs)],
                             lambda queue: self.owner(queue, context), errors_)
        answers: dict[int, pb.EnqueueResponse] = {}
        waits: Waits = {}
        for group, indexes in routes.local.values():
            items = []
            for i in indexes:
                spec = specs[i]
                assert spec is not None
                spec.queue = scoped(spec.queue)
                items.append((spec, jobs[i].strict_unique, jobs[i].request_id))
            # The group's share in one command (one per job would flood the
            # replication log with a big batch).
            done = waits.setdefault(group, [])
            for i, result in zip(indexes, machine_of(group).decisions.enqueue_batch(items, now),
                                 strict=True):
                if isinstance(result, ServiceError):
                    errors_[i] = item_error(result, f"jobs[{i}].")
                    continue
                answers[i] = _enqueued(result, now)
                done.append((i, result.seq))

        def forward(target: Redirect, indexes: list[int]) -> Awaitable[Any]:
            share = pb.EnqueueBatchRequest(jobs=[jobs[i] for i in indexes])
            return self.forward(target, "EnqueueBatch", share, context)

        await settle(routes, waits, forward, answers, errors_, "job", "jobs")
        return answer_all(pb.EnqueueBatchResponse(), len(jobs), answers, errors_, "job")

    async def Claim(self, request: pb.ClaimRequest, context: Ctx) -> pb.ClaimResponse:
        queues = v.claim_queues(request.queues)
        v.check_worker(request.worker_id)
        max_jobs = v.max_jobs(request.max_jobs)
        lease_ns = v.lease_ns(request.lease_duration, self.limits, "lease_duration") \
            or int(self.limits.default_lease * 1e9)
        wait_ns = v.wait_ns(request.wait)
        here, remote = self.split(queues, context)
        if remote:
            first, _ = next(iter(remote.values()))
            if not here and len(remote) == 1:  # all led by one other node
                return cast(pb.ClaimResponse,
                            await self.forward(first, "Claim", request, context))
            raise wrong_owner(first)  # one claim cannot span several owners
        local = {group: [scoped(queues[i]) for i in indexes]
                 for group, indexes in here.values()}
        sources = [(m, queue) for group, names in local.items()
                   for m in (machine_of(group),) for name in names
                   if (queue := m.state.queues.get(name)) is not None]
        room = self._room()
        claimed = claim(sources, request.worker_id, max_jobs, lease_ns, self.clock.wall_ns(),
                        room)
        if not claimed and wait_ns:
            remaining = context.time_remaining()
            if remaining is not None:
                wait_ns = min(wait_ns, int(remaining * 1e9) - _DEADLINE_MARGIN_NS)
            if wait_ns > 0:
                claimed = await self._wait(local, request.worker_id, max_jobs, lease_ns,
                                           wait_ns, room)
        return pb.ClaimResponse(jobs=await _committed(claimed))

    @staticmethod
    async def _wait(local: dict[Group, list[str]], worker_id: str, max_jobs: int,
                    lease_ns: int, wait_ns: int, room: Room) -> list[Claimed]:
        """Wait (long poll) until jobs are leased to this call, or time runs out."""
        waiter = ClaimWaiter(worker_id, max_jobs, lease_ns, room)
        for group, names in local.items():
            leader = machine_of(group).leader
            if leader is None:
                waiter.leave()
                raise errors.primary_lost(group.group_id)
            leader.add_waiter(waiter, names)
        future = waiter.future
        try:
            await asyncio.wait({future}, timeout=wait_ns / 1e9)
        except asyncio.CancelledError:
            waiter.leave()
            if future.done() and not future.cancelled() and future.exception() is None:
                for c in future.result():
                    c.machine.decisions.abandon(c)
            raise
        if not future.done():
            waiter.leave()
            return []
        return future.result()

    def _room(self, given: int = 0) -> Room:
        """The room for claimed jobs in one answer: three quarters of a message,
        the rest left for what else a batch's answer holds; at most ``given``
        bytes if set (a forwarded share's: no job passes it)."""
        room = self.max_message_bytes * 3 // 4
        return Room(min(given, room), strict=True) if given else Room(room)

    def _next(self, request: pb.CompleteRequest | pb.FailRequest, room: Room | None = None
              ) -> Next | None:
        """A Complete's or Fail's ``next``, checked: what is ready in those of its
        queues this node leads (unset: None), within ``room`` (a batch's, shared;
        else its own)."""
        if not request.HasField("next"):
            return None
        assert self.forwarder is not None
        queues, worker_id, most, lease_ns = v.claim_next(request.next, self.limits)
        resolve = self.forwarder.replication.resolve
        sources = [(m, queue) for name in queues
                   if isinstance(group := resolve(slot_for(name)), Group) and group.writable
                   for m in (machine_of(group),)
                   if (queue := m.state.queues.get(scoped(name))) is not None]
        return Next(sources, worker_id, most, lease_ns, room if room is not None else self._room())

    @routed("job_id")
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx,
                        group: Group) -> pb.HeartbeatResponse:
        v.check_job_id(request.job_id)
        extend = v.lease_ns(request.extend, self.limits, "extend")
        own(group, request.job_id)
        decide = machine_of(group).decisions
        job, seq = decide.heartbeat(request.job_id, request.lease_token, extend)
        response = pb.HeartbeatResponse(lease_expire_time=timestamp(job.lease_expire_ns))
        await group.wait_committed(seq)
        return response

    async def HeartbeatBatch(self, request: pb.HeartbeatBatchRequest, context: Ctx
                             ) -> pb.HeartbeatBatchResponse:
        leases = request.leases
        v.check_batch(len(leases), "leases", MAX_BATCH)
        if len({lease.job_id for lease in leases}) != len(leases):
            raise invalid_argument("leases", "must not name a job twice")
        errors_: dict[int, pb.ItemError] = {}
        extends: list[int | None] = []
        keys: list[str | None] = []
        for i, lease in enumerate(leases):
            try:
                v.check_job_id(lease.job_id)
                extends.append(v.lease_ns(lease.extend, self.limits, "extend"))
                keys.append(lease.job_id)
            except MeshStatusError as exc:
                errors_[i] = item_error(exc, f"leases[{i}].")
                extends.append(None)
                keys.append(None)
        routes = route_items(keys, lambda job_id: self.owner(job_id, context), errors_)
        answers: dict[int, pb.HeartbeatResponse] = {}
        waits: Waits = {}
        for group, indexes in routes.local.values():
            decide, done = machine_of(group).decisions, waits.setdefault(group, [])
            for i in indexes:
                lease = leases[i]
                try:
                    own(group, lease.job_id)
                    job, seq = decide.heartbeat(lease.job_id, lease.lease_token, extends[i])
                except REFUSALS as exc:
                    errors_[i] = item_error(exc, f"leases[{i}].")
                    continue
                answers[i] = pb.HeartbeatResponse(
                    lease_expire_time=timestamp(job.lease_expire_ns))
                done.append((i, seq))

        def forward(target: Redirect, indexes: list[int]) -> Awaitable[Any]:
            share = pb.HeartbeatBatchRequest(leases=[leases[i] for i in indexes])
            return self.forward(target, "HeartbeatBatch", share, context)

        await settle(routes, waits, forward, answers, errors_, "lease", "leases")
        return answer_all(pb.HeartbeatBatchResponse(), len(leases), answers, errors_, "lease")

    @routed("job_id")
    async def Complete(self, request: pb.CompleteRequest, context: Ctx,
                       group: Group) -> pb.CompleteResponse:
        v.check_job_id(request.job_id)
        v.check_result(request.result, self.limits)
        then = self._next(request)  # refused, if bad, before the job is finished
        own(group, request.job_id)
        finish_ns, seq, claimed = machine_of(group).decisions.complete(
            request.job_id, request.lease_token, request.result, then)
        await group.wait_committed(seq)
        return pb.CompleteResponse(finish_time=timestamp(finish_ns),
                                   next_jobs=await _committed(claimed))

    async def CompleteBatch(self, request: pb.CompleteBatchRequest, context: Ctx
                            ) -> pb.CompleteBatchResponse:
        completes = request.completes
        v.check_batch(len(completes), "completes", MAX_BATCH)
        if len({c.job_id for c in completes}) != len(completes):
            raise invalid_argument("completes", "must not name a job twice")
        errors_: dict[int, pb.ItemError] = {}
        nexts: list[Next | None] = []
        keys: list[str | None] = []
        room = self._room(request.max_next_bytes)  # the next jobs of every item: one answer
        for i, c in enumerate(completes):
            try:
                v.check_job_id(c.job_id)
                v.check_result(c.result, self.limits)
                nexts.append(self._next(c, room))
                keys.append(c.job_id)
            except MeshStatusError as exc:
                errors_[i] = item_error(exc, f"completes[{i}].")
                nexts.append(None)
                keys.append(None)
        routes = route_items(keys, lambda job_id: self.owner(job_id, context), errors_)
        finished: dict[int, tuple[int, list[Claimed]]] = {}
        waits: Waits = {}
        for group, indexes in routes.local.values():
            done, mine = waits.setdefault(group, []), []
            for i in indexes:
                try:
                    own(group, completes[i].job_id)
                except REFUSALS as exc:
                    errors_[i] = item_error(exc, f"completes[{i}].")
                    continue
                mine.append(i)
            # The group's completions end by one command (`complete_many`).
            outcomes = machine_of(group).decisions.complete_many(
                [(completes[i].job_id, completes[i].lease_token, completes[i].result, nexts[i])
                 for i in mine])
            for i, outcome in zip(mine, outcomes, strict=True):
                if isinstance(outcome, REFUSALS):
                    errors_[i] = item_error(outcome, f"completes[{i}].")
                    continue
                finish_ns, seq, claimed = outcome
                finished[i] = (finish_ns, claimed)
                done.append((i, seq))

        def forward(target: Redirect, indexes: list[int]) -> Awaitable[Any]:
            # What this answer has left once the local completions claimed their
            # next jobs, shared by the shares: each owner fills its own answer,
            # and this one carries them all. (Before, each owner took a room
            # of its own: together past a message, refused after leasing.)
            left = max(room.left // len(routes.remote), 1)
            share = pb.CompleteBatchRequest(completes=[completes[i] for i in indexes],
                                            max_next_bytes=left)
            return self.forward(target, "CompleteBatch", share, context)

        answers: dict[int, pb.CompleteResponse] = {}
        await settle(routes, waits, forward, answers, errors_, "completed", "completes")

        async def next_jobs(i: int, finish_ns: int, claimed: list[Claimed]) -> None:
            # As Complete: the next jobs once their leases are committed.
            try:
                jobs = await _committed(claimed)
            except REFUSALS as exc:  # completed, but the next jobs are not ours
                errors_[i] = item_error(exc)
                return
            answers[i] = pb.CompleteResponse(finish_time=timestamp(finish_ns), next_jobs=jobs)

        await asyncio.gather(*(next_jobs(i, *done) for i, done in finished.items()
                               if i not in errors_))
        return answer_all(pb.CompleteBatchResponse(), len(completes), answers, errors_,
                          "completed")

    @routed("job_id")
    async def Fail(self, request: pb.FailRequest, context: Ctx,
                   group: Group) -> pb.FailResponse:
        v.check_job_id(request.job_id)
        retry_delay = duration_ns("retry_delay", request.retry_delay) \
            if request.HasField("retry_delay") else None
        then = self._next(request)
        own(group, request.job_id)
        failed = machine_of(group).decisions.fail(request.job_id, request.lease_token,
                                         v.error_text(request.error), request.retryable,
                                         retry_delay, then)
        await group.wait_committed(failed.seq)
        response = pb.FailResponse(attempts=failed.attempts,
                                   next_jobs=await _committed(failed.claimed))
        if failed.state == DEAD:
            response.state = pb.JOB_STATE_DEAD
        else:
            response.state = shown_state(failed.state, failed.run_ns, self.clock.wall_ns())
            response.next_run_time.CopyFrom(timestamp(failed.run_ns))
        return response

    @routed("job_id")
    async def Cancel(self, request: pb.CancelRequest, context: Ctx,
                     group: Group) -> pb.CancelResponse:
        v.check_job_id(request.job_id)
        own(group, request.job_id)
        cancelled, job, seq = machine_of(group).decisions.cancel(request.job_id)
        now = self.clock.wall_ns()
        response = pb.CancelResponse(cancelled=cancelled,
                                     state=shown_state(job.state, job.run_ns, now))
        await group.wait_committed(seq)
        return response

    # -- dead letters ---------------------------------------------------------------

    @routed("queue")
    async def RequeueDeadLetters(self, request: pb.RequeueDeadLettersRequest, context: Ctx,
                                 group: Group) -> pb.RequeueDeadLettersResponse:
        v.check_name(request.queue, "queue")
        v.check_ids(request.job_ids)
        requeued, remaining, seq = machine_of(group).decisions.requeue(scoped(request.queue),
                                                              request.job_ids)
        await group.wait_committed(seq)
        return pb.RequeueDeadLettersResponse(requeued=requeued, remaining=remaining)

    @routed("queue")
    async def PurgeDeadLetters(self, request: pb.PurgeDeadLettersRequest, context: Ctx,
                               group: Group) -> pb.PurgeDeadLettersResponse:
        v.check_name(request.queue, "queue")
        v.check_ids(request.job_ids)
        if request.all and request.job_ids:
            raise invalid_argument("job_ids", "must be empty when all is true")
        purged, remaining, seq = machine_of(group).decisions.purge(scoped(request.queue),
                                                          request.job_ids, request.all)
        await group.wait_committed(seq)
        return pb.PurgeDeadLettersResponse(purged=purged, remaining=remaining)

    # -- schedules ---------------------------------------------------------------------

    @routed("queue")
    async def CreateSchedule(self, request: pb.CreateScheduleRequest, context: Ctx,
                             group: Group) -> pb.CreateScheduleResponse:
        record = v.cron_spec(request, self.limits, self.clock.wall_ns())
        record.queue = scoped(record.queue)
        schedule, seq = machine_of(group).decisions.put_schedule(record, request.replace)
        response = pb.CreateScheduleResponse(schedule=schedule_view(schedule))
        await group.wait_committed(seq)
        return response

    @routed("queue")
    async def DeleteSchedule(self, request: pb.DeleteScheduleRequest, context: Ctx,
                             group: Group) -> pb.DeleteScheduleResponse:
        v.check_name(request.queue, "queue")
        v.check_name(request.schedule_id, "schedule_id")
        deleted, seq = machine_of(group).decisions.remove_schedule(scoped(request.queue),
                                                          request.schedule_id)
        await group.wait_committed(seq)
        return pb.DeleteScheduleResponse(deleted=deleted)
