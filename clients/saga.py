"""Sagas: a type's steps as decorated handlers, and typed calls.

    order = SagaType("order", queue="orders")

    @order.step("reserve")
    async def reserve(step: StepContext) -> dict: ...       # the action

    @order.compensate("reserve")
    async def release(step: StepContext) -> None: ...        # undoes it

    @order.step("charge", timeout=30)
    async def charge(step: StepContext) -> dict: ...

    await mesh.sagas.register(order)
    async with mesh.sagas.worker(order, concurrency=16):     # runs the handlers
        await mesh.sagas.start(order, "order-42", {"items": 3})
        saga = await mesh.sagas.result("order-42", timeout=30)

Steps run one after another, in the order they were declared; ``parallel=True``
puts a step in the same stage as the one declared before it. A step's action is
the job type ``<type>.<step>`` and its compensation ``<type>.<step>.compensate``
in the type's queue (or the step's own). Workers are ordinary scheduler
workers (`clients.worker.Worker`): ``mesh.sagas.worker`` builds one with the
type's handlers that also tells the saga when a job ended, so that it moves on
at once (it would find out by itself within the node's check interval).

A handler gets a `StepContext`: the saga's input, the results of the steps
that succeeded before it, and an ``idempotency_key`` to pass to the systems it
changes (the same for every attempt of the action, so a repeated attempt is
recognised). It returns the step's result (bytes, str, or JSON). It raises
``PermanentJobError`` for a business failure that left no effect (the saga
compensates the steps before it); any other exception is retried by the
scheduler. A compensation must tolerate an action that never happened: it
runs for steps whose outcome is unknown too (``StepContext.action_state``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clients.durations import duration
from clients.errors import DeadlineExceededError, InvalidArgumentError, MeshError
from clients.job_runtime import Handler, JobContext
from clients.job_types import Payload, encode
from clients.requests import build, under
from clients.retry import with_retries
from mesh.saga.v1 import saga_pb2 as pb
from mesh.saga.v1 import saga_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh
    from clients.worker import Worker

__all__ = ["Saga", "SagaClient", "SagaState", "SagaType", "StepContext", "StepView"]

SERVICE = "saga"
REPORT_TIMEOUT = 5.0
"""Seconds a worker's report of a finished step may take (it is only a hint)."""

log = logging.getLogger(__name__)

StepHandler = Callable[["StepContext"], Any]
"""An async function, or a plain one (run in a thread), returning the result."""


class SagaState:
    """Saga states, as the names the proto gives them (without the prefix)."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    NEEDS_ATTENTION = "NEEDS_ATTENTION"
    FINAL = frozenset({COMPLETED, COMPENSATED, NEEDS_ATTENTION})


def _state(value: int) -> str:
    return pb.SagaState.Name(value).removeprefix("SAGA_STATE_")  # type: ignore[arg-type]


def _task_state(value: int) -> str:
    return pb.TaskState.Name(value).removeprefix("TASK_STATE_")  # type: ignore[arg-type]


@dataclass(frozen=True)
class StepView:
    """A step of a saga as it stands: its action's and compensation's states
    (WAITING, DISPATCHING, RUNNING, SUCCEEDED, FAILED, UNKNOWN, SKIPPED)."""

    name: str
    stage: int
    action: str
    compensation: str
    result: bytes
    action_job_id: str
    compensation_job_id: str
    error: str


@dataclass(frozen=True)
class Saga:
    """A saga: its state, steps and history (``(kind, step, detail)`` entries)."""

    saga_id: str
    type: str
    version: int
    state: str
    input: bytes
    steps: list[StepView]
    history: list[tuple[str, str, str]]
    error: str
    cancel_requested: bool

    @classmethod
    def from_proto(cls, s: pb.Saga) -> Saga:
        return cls(
            s.saga_id, s.type, s.version, _state(s.state), s.input,
            [StepView(st.name, st.stage, _task_state(st.action.state),
                      _task_state(st.compensation.state), st.result, st.action.job_id,
                      st.compensation.job_id, st.action.error or st.compensation.error)
             for st in s.steps],
            [(h.kind, h.step, h.detail) for h in s.history], s.error, s.cancel_requested)

    @property
    def done(self) -> bool:
        return self.state in SagaState.FINAL

    def result(self, step: str) -> Any:
        """A step's result, decoded from JSON (raw bytes if it is not JSON)."""
        return _decode(next(s.result for s in self.steps if s.name == step))


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return data


@dataclass(frozen=True)
class StepContext:
    """What a step's handler works on."""

    task: pb.StepTask
    job: JobContext

    @property
    def saga_id(self) -> str:
        return self.task.saga_id

    @property
    def step(self) -> str:
        return self.task.step

    @property
    def is_compensation(self) -> bool:
        return self.task.phase == pb.PHASE_COMPENSATION

    @property
    def input(self) -> Any:
        """The saga's input, decoded from JSON (raw bytes if it is not JSON)."""
        return _decode(self.task.input)

    def result(self, step: str) -> Any:
        """The result of an earlier step that succeeded (None if it did not)."""
        return _decode(self.task.results[step]) if step in self.task.results else None

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this action (or compensation)."""
        return self.task.idempotency_key

    @property
    def action_key(self) -> str:
        """For a compensation: the idempotency key its action was given (what to undo)."""
        return self.task.action_idempotency_key

    @property
    def action_state(self) -> str:
        """For a compensation: SUCCEEDED, or UNKNOWN (the action may not have run)."""
        return _task_state(self.task.action_state)


@dataclass
class _Step:
    name: str
    stage: int
    queue: str
    timeout: float | None
    max_attempts: int
    attempt_timeout: float | None
    action: StepHandler | None = None
    compensation: StepHandler | None = None


@dataclass
class SagaType:
    """A saga type built from decorated step handlers."""

    name: str
    queue: str
    steps: list[_Step] = field(default_factory=list)

    def action_type(self, step: str) -> str:
        return f"{self.name}.{step}"

    def compensation_type(self, step: str) -> str:
        return f"{self.name}.{step}.compensate"

    def _find(self, step: str) -> _Step:
        for s in self.steps:
            if s.name == step:
                return s
        raise ValueError(f"saga type {self.name!r} has no step {step!r}")

    def step(self, name: str, *, parallel: bool = False, queue: str = "",
             timeout: float | None = None, max_attempts: int = 0,
             attempt_timeout: float | None = None) -> Callable[[StepHandler], StepHandler]:
        """Declare the next step, with its action (``parallel``: in the same stage
        as the step declared before; ``timeout``: seconds the action may take over
        all its attempts; ``max_attempts``: 0 = the scheduler's default)."""
        def declare(handler: StepHandler) -> StepHandler:
            if any(s.name == name for s in self.steps):
                raise ValueError(f"step {name!r} is declared twice")
            last = self.steps[-1].stage if self.steps else -1
            stage = last if parallel and self.steps else last + 1
            self.steps.append(_Step(name, stage, queue or self.queue, timeout, max_attempts,
                                    attempt_timeout, action=handler))
            return handler
        return declare

    def compensate(self, name: str) -> Callable[[StepHandler], StepHandler]:
        """Declare the compensation of step ``name`` (declared before)."""
        def declare(handler: StepHandler) -> StepHandler:
            self._find(name).compensation = handler
            return handler
        return declare

    def definition(self) -> pb.SagaDefinition:
        out = pb.SagaDefinition(name=self.name)
        for s in self.steps:
            while len(out.stages) <= s.stage:
                out.stages.add()
            step = out.stages[s.stage].steps.add(name=s.name)
            at = f"stages[{s.stage}].steps[{len(out.stages[s.stage].steps) - 1}]"
            try:
                step.action.CopyFrom(build(pb.JobSpec)(
                    queue=s.queue, type=self.action_type(s.name), max_attempts=s.max_attempts))
            except InvalidArgumentError as exc:
                raise under(f"{at}.action", exc) from None
            if s.attempt_timeout is not None:
                step.action.attempt_timeout.CopyFrom(
                    duration(s.attempt_timeout, f"{at}.action.attempt_timeout"))
            if s.compensation is not None:
                step.compensation.queue = s.queue
                step.compensation.type = self.compensation_type(s.name)
            if s.timeout is not None:
                step.timeout.CopyFrom(duration(s.timeout, f"{at}.timeout"))
        return out

    def queues(self) -> list[str]:
        return list(dict.fromkeys(s.queue for s in self.steps))

    def handlers(self) -> dict[str, Handler]:
        """Scheduler handlers (job type -> handler) running the step handlers."""
        out: dict[str, Handler] = {}
        for s in self.steps:
            if s.action is not None:
                out[self.action_type(s.name)] = _job_handler(s.action)
            if s.compensation is not None:
                out[self.compensation_type(s.name)] = _job_handler(s.compensation)
        return out


def _job_handler(handler: StepHandler) -> Handler:
    """The scheduler handler of a step handler. A plain one stays plain: the
    worker runs it in a thread of its own, like any plain job handler (not in
    the loop's default executor, whose few threads would cap the worker's
    concurrency and stay taken by handlers whose lease was lost)."""
    if inspect.iscoroutinefunction(handler):
        async def run_async(job: JobContext) -> bytes:
            return encode(await handler(StepContext(pb.StepTask.FromString(job.payload), job)))
        return run_async

    def run(job: JobContext) -> bytes:
        return encode(handler(StepContext(pb.StepTask.FromString(job.payload), job)))
    return run


class SagaClient:
    """Saga types and sagas, spread over the mesh's nodes. Every call takes ``timeout=``."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def _call(self, key: str, method: str, request: Any, timeout: float | None,
                    address: str | None = None) -> Any:
        async def attempt(budget: float, redirected: str | None) -> Any:
            where = redirected or address or self._mesh.route(SERVICE, key).address
            return await self._mesh.call(pb_grpc.SagaServiceStub, where, method, request,
                                         budget)

        # Every call is safe to repeat: StartSaga is idempotent by id,
        # RegisterSagaType by definition, CancelSaga ends in the same state.
        return await with_retries(self._mesh, attempt, timeout=timeout, safe=True)

    async def register(self, saga_type: SagaType | pb.SagaDefinition, *,
                       timeout: float | None = None) -> int:
        """Store the type's definition; returns its version (the latest one if
        the definition did not change)."""
        definition = saga_type.definition() if isinstance(saga_type, SagaType) else saga_type
        r = await self._call(definition.name, "RegisterSagaType",
                             pb.RegisterSagaTypeRequest(definition=definition), timeout)
        return int(r.version)

    async def start(self, saga_type: SagaType | str, saga_id: str,
                    input: Payload | None = None, *, version: int = 0,
                    timeout: float | None = None) -> Saga:
        """Start saga ``saga_id`` (idempotent: the same id, type and input return
        the existing saga) with ``input`` (bytes, str or JSON)."""
        name = saga_type.name if isinstance(saga_type, SagaType) else saga_type
        request = build(pb.StartSagaRequest)(
            saga_id=saga_id, type=name, version=version, input=encode(input))
        r = await self._call(saga_id, "StartSaga", request, timeout)
        return Saga.from_proto(r.saga)

    async def get(self, saga_id: str, *, wait: float = 0.0,
                  timeout: float | None = None) -> Saga:
        """The saga with its steps and history (``wait``: up to that many seconds,
        at most 60, for it to end)."""
        request = pb.GetSagaRequest(saga_id=saga_id)
        if wait:
            request.wait.CopyFrom(duration(min(wait, 60.0), "wait"))
        budget = None if timeout is None else timeout
        if wait:
            budget = max(budget or 0.0, wait + self._mesh.timeout)
        r = await self._call(saga_id, "GetSaga", request, budget)
        return Saga.from_proto(r.saga)

    async def result(self, saga_id: str, timeout: float) -> Saga:
        """The saga once it ended (COMPLETED, COMPENSATED or NEEDS_ATTENTION);
        DeadlineExceededError if it has not after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            saga = await self.get(saga_id, wait=max(0.0, min(left, 30.0)))
            if saga.done:
                return saga
            if loop.time() >= deadline:
                raise DeadlineExceededError(
                    f"saga {saga_id!r} is still {saga.state} after {timeout:g} s")

    async def cancel(self, saga_id: str, reason: str = "", *,
                     timeout: float | None = None) -> Saga:
        """Stop a running saga: what took effect is compensated."""
        r = await self._call(saga_id, "CancelSaga",
                             pb.CancelSagaRequest(saga_id=saga_id, reason=reason), timeout)
        return Saga.from_proto(r.saga)

    async def list_sagas(self, *, state: str | None = None, saga_type: str = "",
                   page_size: int = 100, timeout: float | None = None) -> AsyncIterator[Saga]:
        """Every saga (without history), by id, in pages of ``page_size``."""
        if state is not None and f"SAGA_STATE_{state}" not in pb.SagaState.keys():  # noqa: SIM118
            raise InvalidArgumentError(f"unknown saga state {state!r}")
        value = pb.SagaState.Value(f"SAGA_STATE_{state}") if state else 0
        token = ""
        while True:
            target = self._mesh.any_node(SERVICE).address
            request = build(pb.ListSagasRequest)(
                state=value, type=saga_type, page_size=page_size, page_token=token)  # type: ignore[arg-type]
            r = await self._call("", "ListSagas", request, timeout, address=target)
            for s in r.sagas:
                yield Saga.from_proto(s)
            token = r.next_page_token
            if not token:
                return

    async def report(self, saga_id: str, job_id: str, *, timeout: float | None = None) -> None:
        """Tell the saga that its job ``job_id`` ended (it checks for itself)."""
        await self._call(saga_id, "ReportStep",
                         pb.ReportStepRequest(saga_id=saga_id, job_id=job_id), timeout)

    def worker(self, *saga_types: SagaType, concurrency: int = 10, **options: Any) -> Worker:
        """A worker pool running these types' step handlers on their queues, which
        reports each finished step to its saga (``options``: see `Worker`)."""
        from clients.worker import Worker

        handlers: dict[str, Handler] = {}
        queues: list[str] = []
        for t in saga_types:
            handlers.update(t.handlers())
            queues.extend(q for q in t.queues() if q not in queues)

        reports: set[asyncio.Task[None]] = set()  # the loop keeps only weak refs

        async def report(saga_id: str, job_id: str) -> None:
            try:
                await self.report(saga_id, job_id, timeout=REPORT_TIMEOUT)
            except MeshError as exc:  # the saga finds the outcome by itself
                log.debug("report of job %s to saga %s failed: %s", job_id, saga_id, exc)

        async def ended(job: JobContext, succeeded: bool) -> None:
            # A hint only: the saga reads the job's outcome from the scheduler, and
            # checks every --saga-check-interval anyway. Sent in the background,
            # so a saga primary that is failing over holds no slot of the pool.
            task = asyncio.create_task(
                report(pb.StepTask.FromString(job.payload).saga_id, job.id))
            reports.add(task)
            task.add_done_callback(reports.discard)

        return Worker(self._mesh, queues, handlers, concurrency=concurrency,
                      on_ended=ended, **options)
