"""The saga primary's hands: it does what the records of the groups it leads ask for.

The state machine only decides; this is where the I/O is (etcd raft's split).
For every saga in flight in a group this node leads, the driver

- enqueues the job of each task the record put in DISPATCHING (the outbox: the
  decision committed first), with a request id made of the saga, the step and
  the phase, so that enqueueing again after a failover returns the same job,
  and proposes `TaskDispatched` with its id;
- reads the job of each RUNNING task from the scheduler when a worker reports
  it (ReportStep), and every ``check_interval`` otherwise, and proposes
  `TaskEnded` once the job ended: the scheduler's committed state, never a
  worker's word, is what a step's outcome is taken from;
- cancels the job of a step past its timeout, or of a saga being cancelled,
  then reads what the job did;
- appends the history to the event store (stream "saga-<id>", event ids are
  the entries' indexes, so a repeat is a duplicate) and proposes how far it got:
  at once when the saga ends, and while it runs on its periodic pass (every
  ``SCAN_SECONDS``) once what is unpublished is ``PUBLISH_AFTER_NS`` old.
  Appending each transition as it happened cost an Append call and a
  replicated command per transition, a third of a saga's calls, for a stream
  that is read after the fact.

Calls go through `InternalClient` as the saga's tenant. A call that fails is
tried again later (with backoff); nothing here decides on a failure to reach
another node, only on what the scheduler says happened to a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from common.clock import SYSTEM_CLOCK, Clock, from_seconds
from common.errors import MeshStatusError
from common.slots import slot_for
from common.tasks import cancel
from common.tenancy import unscoped
from mesh.events.v1 import events_pb2 as epb
from mesh.saga.v1 import saga_pb2 as pb
from mesh.saga.v1 import saga_replication_pb2 as spb
from mesh.scheduler.v1 import scheduler_pb2 as schedpb
from nodes.config import SagaLimits
from nodes.internal_client import InternalClient, transient
from nodes.replication.group import Group
from nodes.saga import progress
from nodes.saga.machine import SAGA, SagaMachine

__all__ = ["Driver", "job_outcome", "request_id", "step_task"]

log = logging.getLogger(__name__)

SCHEDULER = "/mesh.scheduler.v1.SchedulerService/"
EVENTS = "/mesh.events.v1.EventsService/"
RETRY_NS = 500_000_000
"""A failed call is tried again after this long (doubling, up to the check interval)."""
WARN_EVERY_NS = 60_000_000_000
SCAN_SECONDS = 0.25
"""How often the driver walks its sagas for timeouts, due checks and history to
append."""
PUBLISH_AFTER_NS = 1_000_000_000
"""A running saga's history is appended once its oldest unpublished entry is this
old (an ended saga's at once). Most sagas end sooner and append their history in
one call: appending on every pass cost a short saga a second Append, and two
replicated commands, two times in three (``bench.saga``)."""

CONTENT_TYPE = "application/x-protobuf; messageType=mesh.saga.v1.HistoryEntry"
"""Of the events a saga appends: each holds one HistoryEntry."""

TaskKey = tuple[int, str, int, int]
"""(group id, saga id, step index, phase)."""


def request_id(saga_id: str, step: str, phase: pb.Phase.ValueType) -> str:
    """The Enqueue request id of a task: the same for every try of it."""
    return f"saga/{saga_id}/{step}/{'action' if phase == pb.PHASE_ACTION else 'compensation'}"


def step_task(record: spb.SagaRecord, step: int, phase: pb.Phase.ValueType) -> pb.StepTask:
    """The payload of a task's job."""
    saga = record.saga
    s = saga.steps[step]
    saga_id = unscoped(saga.saga_id)
    name = "action" if phase == pb.PHASE_ACTION else "compensation"
    out = pb.StepTask(saga_id=saga_id, saga_type=unscoped(saga.type), step=s.name,
                      phase=phase, input=saga.input,
                      idempotency_key=f"{saga_id}/{s.name}/{name}")
    for other in saga.steps:
        if other.action.state == pb.TASK_STATE_SUCCEEDED:
            out.results[other.name] = other.result
    if phase == pb.PHASE_COMPENSATION:
        out.action_state = s.action.state
        out.action_idempotency_key = f"{saga_id}/{s.name}/action"
    return out


def _ran(job: schedpb.Job) -> bool:
    """Whether any attempt of the job got to run (a claim abandoned before it was
    answered never did)."""
    return any(a.outcome != schedpb.ATTEMPT_OUTCOME_ABANDONED for a in job.attempts)


def job_outcome(job: schedpb.Job) -> tuple[pb.TaskState.ValueType, str] | None:
    """What a job's state says about its task: SUCCEEDED, FAILED (every attempt
    failed through Fail, or it never ran), UNKNOWN (an attempt may have taken
    effect without completing), with the error; None while it is unfinished."""
    state = job.state
    if state == schedpb.JOB_STATE_SUCCEEDED:
        return pb.TASK_STATE_SUCCEEDED, ""
    if state == schedpb.JOB_STATE_DEAD:
        ran = [a for a in job.attempts if a.outcome != schedpb.ATTEMPT_OUTCOME_ABANDONED]
        if ran and all(a.outcome == schedpb.ATTEMPT_OUTCOME_FAILED for a in ran):
            return pb.TASK_STATE_FAILED, job.last_error or "the job failed"
        return pb.TASK_STATE_UNKNOWN, job.last_error or "the job went dead"
    if state == schedpb.JOB_STATE_CANCELLED:
        if _ran(job):
            return pb.TASK_STATE_UNKNOWN, "its job was cancelled during an attempt"
        return pb.TASK_STATE_FAILED, "its job was cancelled before it ran"
    return None


@dataclass(slots=True)
class _Due:
    at_ns: int
    backoff_ns: int = 0


class Driver:
    """Drives the sagas of every group this node leads."""

    def __init__(self, limits: SagaLimits, clock: Clock = SYSTEM_CLOCK) -> None:
        self.limits = limits
        self.clock = clock
        self._client: InternalClient | None = None
        self._led_in: Callable[[int], SagaMachine | None] = lambda _gid: None
        self._check_ns = from_seconds(limits.check_interval)
        self._due: dict[TaskKey, _Due] = {}
        """When a RUNNING task's job is next read (absent: at first sight)."""
        self._retry: dict[tuple[int, str, str], _Due] = {}
        """Dispatches and publications that failed, by (group, saga, what)."""
        self._busy: set[tuple[int, str, str]] = set()
        self._dirty: set[tuple[int, str]] = set()
        self._working: set[int] = set()
        """The groups led here whose sagas changed since they last had none in flight
        and no history to append: the periodic pass walks these, not every group
        the node leads (at 4096 groups that walk, four times a second, was most of
        an idle node's CPU)."""
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(limits.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._warned: dict[tuple[str, grpc.StatusCode], int] = {}
        self.calls = 0
        """Scheduler and event store calls made (for metrics)."""

    def start(self, client: InternalClient,
              led_in: Callable[[int], SagaMachine | None]) -> None:
        """``led_in(group_id)``: the saga machine of that group, if led here."""
        self._client, self._led_in = client, led_in
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(Exception):
                await cancel(t)  # again until it ends: a call's wait_for may swallow one

    # -- what wakes it -------------------------------------------------------

    def changed(self, group: Group, saga_id: str) -> None:
        """A saga of ``group`` changed (or the group became led here: every saga in
        flight is then said to have changed)."""
        if group.writable:
            self._dirty.add((group.group_id, saga_id))
            self._working.add(group.group_id)
            self._wake.set()

    def reported(self, group: Group, saga_id: str, job_id: str) -> None:
        """A worker says ``job_id`` of the saga ended: read it now."""
        machine = group.machines.get(SAGA)
        record = machine.sagas.get(saga_id) if isinstance(machine, SagaMachine) else None
        if record is None:
            return
        for i, s in enumerate(record.saga.steps):
            for phase, t in ((pb.PHASE_ACTION, s.action), (pb.PHASE_COMPENSATION, s.compensation)):
                if t.state == pb.TASK_STATE_RUNNING and t.job_id == job_id:
                    self._due[(group.group_id, saga_id, i, phase)] = _Due(0)
        self.changed(group, saga_id)

    def forget_group(self, group: Group) -> None:
        """The group is no longer led here: its pending work goes with it."""
        gid = group.group_id
        self._working.discard(gid)
        for key in [k for k in self._due if k[0] == gid]:
            del self._due[key]
        for rkey in [k for k in self._retry if k[0] == gid]:
            del self._retry[rkey]
        self._dirty = {d for d in self._dirty if d[0] != gid}

    # -- the loop ---------------------------------------------------------------

    async def _run(self) -> None:
        next_scan = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SCAN_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            now = self.clock.wall_ns()
            loop_now = asyncio.get_running_loop().time()
            try:
                if loop_now >= next_scan:
                    next_scan = loop_now + SCAN_SECONDS
                    for gid in list(self._working):
                        machine = self._led_in(gid)
                        if machine is None or not (machine.active or machine.unpublished):
                            self._working.discard(gid)  # its next change adds it again
                            continue
                        for saga_id in list(machine.active | machine.unpublished):
                            self._examine(machine, saga_id, now, publish=True)
                    self._dirty.clear()
                else:
                    # Looked up group by group: a node leads hundreds of groups,
                    # and this runs on every change of a saga.
                    dirty, self._dirty = self._dirty, set()
                    for gid, saga_id in dirty:
                        led = self._led_in(gid)
                        if led is not None:
                            self._examine(led, saga_id, now, publish=False)
            except Exception:  # a bug must not stop every saga of the node
                log.exception("saga driver pass failed")

    def _examine(self, machine: SagaMachine, saga_id: str, now: int, *, publish: bool
                 ) -> None:
        """Start what ``saga_id`` needs done; its history too if the saga ended, or
        if ``publish`` (the periodic pass) and the history waited long enough."""
        group = machine.group
        record = machine.sagas.get(saga_id)
        if record is None or not group.writable:
            return
        gid = group.group_id
        saga = record.saga
        steps = list(progress.flat_steps(record.definition))
        for i, s in enumerate(saga.steps):
            for phase, t in ((pb.PHASE_ACTION, s.action), (pb.PHASE_COMPENSATION, s.compensation)):
                if t.state == pb.TASK_STATE_DISPATCHING:
                    self._spawn(gid, saga_id, f"dispatch:{i}:{phase}", now,
                                functools.partial(self._dispatch, machine, saga_id, i, phase))
                elif t.state == pb.TASK_STATE_RUNNING:
                    key = (gid, saga_id, i, phase)
                    cancel_why = ""
                    if phase == pb.PHASE_ACTION:
                        if saga.cancel_requested:
                            cancel_why = "the saga was cancelled"
                        timeout_ns = steps[i][1].timeout.ToNanoseconds()
                        if timeout_ns and now >= t.start_time.ToNanoseconds() + timeout_ns:
                            cancel_why = f"the step timed out after {timeout_ns / 1e9:g} s"
                    due = self._due.get(key)
                    if due is None:
                        due = self._due[key] = _Due(0)  # first sight: look now
                    if cancel_why or now >= due.at_ns:
                        self._spawn(gid, saga_id, f"check:{i}:{phase}", now,
                                    functools.partial(self._check, machine, saga_id, i, phase,
                                                      t.job_id, cancel_why))
        if self.limits.publish_events and record.published < len(saga.history) and (
                saga.state in progress.FINAL or (publish and now - saga.history[
                    record.published].time.ToNanoseconds() >= PUBLISH_AFTER_NS)):
            self._spawn(gid, saga_id, "publish", now,
                        functools.partial(self._publish, machine, saga_id))

    def _spawn(self, gid: int, saga_id: str, what: str, now: int,
               work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        key = (gid, saga_id, what)
        if key in self._busy:
            return
        retry = self._retry.get(key)
        if retry is not None and now < retry.at_ns:
            return
        self._busy.add(key)

        async def run() -> None:
            try:
                async with self._limit:
                    await work()
                self._retry.pop(key, None)
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, MeshStatusError) as exc:
                self._backoff(key)
                if not transient(exc):
                    self._warn(saga_id, what, exc)
            except Exception:
                self._backoff(key)
                log.exception("saga %s: %s failed", unscoped(saga_id), what)
            finally:
                self._busy.discard(key)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _warn(self, saga_id: str, what: str,
              exc: grpc.aio.AioRpcError | MeshStatusError) -> None:
        """Log a call that keeps failing for a reason other than a moving owner (a
        service missing from the cluster, a refusal), once a minute per kind."""
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc.code
        kind = (what.partition(":")[0], code)
        now = self.clock.wall_ns()
        if now < self._warned.get(kind, 0):
            return
        self._warned[kind] = now + WARN_EVERY_NS
        log.warning("saga %s: %s failed (%s): %s; retrying (further such failures are "
                    "logged once a minute)", unscoped(saga_id), what, code.name,
                    exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc.message)

    def _backoff(self, key: tuple[int, str, str]) -> None:
        previous = self._retry.get(key)
        backoff = min(max(RETRY_NS, 2 * previous.backoff_ns if previous else 0), self._check_ns)
        self._retry[key] = _Due(self.clock.wall_ns() + backoff, backoff)

    # -- the work ------------------------------------------------------------------

    def _client_or_fail(self) -> InternalClient:
        if self._client is None:
            raise RuntimeError("the saga driver was not started")
        return self._client

    async def _settled(self, machine: SagaMachine, saga_id: str) -> spb.SagaRecord | None:
        """The saga once its latest change is committed (None if it went, or the
        group is no longer led here)."""
        group = machine.group
        seq = machine.changed.get(saga_id, 0)
        if seq > group.commit_seq:
            await group.wait_committed(seq)
        return machine.sagas.get(saga_id) if group.writable else None

    async def _dispatch(self, machine: SagaMachine, saga_id: str, step: int,
                        phase: pb.Phase.ValueType) -> None:
        # The decision to run the task must be committed before its job exists:
        # a new primary then knows of it and enqueues again (the same request
        # id: the same job), instead of never hearing of a job that runs.
        record = await self._settled(machine, saga_id)
        if record is None or progress.task(record.saga, step, phase).state != \
                pb.TASK_STATE_DISPATCHING:
            return
        definition = progress.flat_steps(record.definition)[step][1]
        spec = definition.action if phase == pb.PHASE_ACTION else definition.compensation
        name = record.saga.steps[step].name
        request = schedpb.EnqueueRequest(
            queue=spec.queue, type=spec.type, priority=spec.priority,
            payload=step_task(record, step, phase).SerializeToString(),
            max_attempts=spec.max_attempts or (
                self.limits.compensation_attempts if phase == pb.PHASE_COMPENSATION else 0),
            request_id=request_id(unscoped(saga_id), name, phase))
        if spec.HasField("attempt_timeout"):
            request.timeout.CopyFrom(spec.attempt_timeout)
        self.calls += 1
        try:
            response = await self._client_or_fail().call(
                spec.queue, SCHEDULER + "Enqueue", request, schedpb.EnqueueResponse,
                record.tenant)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # The same request is refused every time (its payload is fixed: the
            # saga's input and the results so far, which can pass the scheduler's
            # payload limit): the task fails now instead of waiting for ever.
            response = None
            refusal = exc.details() or "refused"
        group = machine.group
        record = machine.sagas.get(saga_id)
        if record is None or not group.writable or progress.task(
                record.saga, step, phase).state != pb.TASK_STATE_DISPATCHING:
            return
        if response is None:
            _propose(group, saga_id, spb.SagaCommand(ended=spb.TaskEnded(
                saga_id=saga_id, step=step, phase=phase, state=pb.TASK_STATE_FAILED,
                error=f"the scheduler refused its job: {refusal}")))
            return
        self._due[(group.group_id, saga_id, step, phase)] = _Due(
            self.clock.wall_ns() + self._check_ns)
        _propose(group, saga_id, spb.SagaCommand(dispatched=spb.TaskDispatched(
            saga_id=saga_id, step=step, phase=phase, job_id=response.job_id)))

    async def _check(self, machine: SagaMachine, saga_id: str, step: int,
                     phase: pb.Phase.ValueType, job_id: str, cancel_why: str) -> None:
        record = await self._settled(machine, saga_id)
        if record is None:
            return
        group = machine.group
        key = (group.group_id, saga_id, step, phase)
        client = self._client_or_fail()
        queue_key = job_id  # a job id carries its queue's slot as a hash tag
        if cancel_why:
            self.calls += 1
            try:
                await client.call(queue_key, SCHEDULER + "Cancel",
                                  schedpb.CancelRequest(job_id=job_id), schedpb.CancelResponse,
                                  record.tenant)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise  # (NOT_FOUND: GetJob says so too, below)
        self.calls += 1
        try:
            found = await client.call(queue_key, SCHEDULER + "GetJob",
                                      schedpb.GetJobRequest(job_id=job_id),
                                      schedpb.GetJobResponse, record.tenant)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            outcome: tuple[pb.TaskState.ValueType, str] | None = (
                pb.TASK_STATE_UNKNOWN, "its job is gone (purged, or past its retention)")
            result = b""
        else:
            outcome = job_outcome(found.job)
            result = found.job.result
        if outcome is None:
            self._due[key] = _Due(self.clock.wall_ns() + self._check_ns)
            return
        state, error = outcome
        if cancel_why and state != pb.TASK_STATE_SUCCEEDED:
            error = cancel_why
        record = machine.sagas.get(saga_id)
        if record is None or not group.writable:
            return
        task = progress.task(record.saga, step, phase)
        if task.state != pb.TASK_STATE_RUNNING or task.job_id != job_id:
            return
        self._due.pop(key, None)
        _propose(group, saga_id, spb.SagaCommand(ended=spb.TaskEnded(
            saga_id=saga_id, step=step, phase=phase, job_id=job_id, state=state,
            result=result, error=error)))

    async def _publish(self, machine: SagaMachine, saga_id: str) -> None:
        record = await self._settled(machine, saga_id)
        if record is None:
            return
        saga = record.saga
        start = record.published
        entries = list(saga.history[start:])
        if not entries:
            return
        stream = f"saga-{unscoped(saga_id)}"
        client = self._client_or_fail()

        async def append(batch: list[pb.HistoryEntry]) -> None:
            self.calls += 1
            await client.call(stream, EVENTS + "Append", epb.AppendRequest(
                stream=stream, events=[_event(e) for e in batch]),
                epb.AppendResponse, record.tenant)

        try:
            await append(entries)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # Some were appended by an earlier try whose outcome we never
            # heard: one at a time, each either new or a whole duplicate.
            for entry in entries:
                await append([entry])
        group = machine.group
        if group.writable and saga_id in machine.sagas:
            _propose(group, saga_id, spb.SagaCommand(published=spb.HistoryPublished(
                saga_id=saga_id, up_to=start + len(entries))))


def _event(entry: pb.HistoryEntry) -> epb.EventData:
    return epb.EventData(id=str(entry.index), type=f"saga.{entry.kind}",
                         data=entry.SerializeToString(),
                         content_type=CONTENT_TYPE)


def _propose(group: Group, saga_id: str, command: spb.SagaCommand) -> None:
    """Propose a decision (the caller checked that the group is writable and
    the saga as it expects, with no await since)."""
    group.propose(slot_for(saga_id), SAGA, command.SerializeToString())
