"""How a saga moves: the rules every copy applies, from its record and a decision.

Pure functions over a `SagaRecord` (no clock, no I/O: the time comes with the
command). The primary's driver (`nodes.saga.driver`) does what the record asks
for: it enqueues the jobs of tasks in DISPATCHING, reads the outcome of tasks
in RUNNING from the scheduler, and proposes what it found; applying that
decision here says what runs next.

The order of things:

- RUNNING: the lowest stage whose actions have not all succeeded runs; its
  waiting actions are dispatched together. When every action succeeded the
  saga is COMPLETED.
- An action that FAILED or ended UNKNOWN, or CancelSaga, turns the saga to
  COMPENSATING. Nothing new starts; actions still in flight are waited for
  (CancelSaga has the driver cancel their jobs).
- COMPENSATING: once no action is in flight, the highest stage with a
  compensation still to run runs its compensations together; a step whose
  action never took effect (or that has no compensation) is SKIPPED. When all
  are done the saga is COMPENSATED; a compensation that fails for good makes
  it NEEDS_ATTENTION once its stage's other compensations ended, and nothing
  more happens to it.
"""

from __future__ import annotations

from mesh.saga.v1 import saga_pb2 as pb
from mesh.saga.v1 import saga_replication_pb2 as spb

__all__ = ["FINAL", "IN_FLIGHT", "begin", "cancel", "dispatched", "ended", "flat_steps",
           "new_record", "task"]

FINAL = frozenset({pb.SAGA_STATE_COMPLETED, pb.SAGA_STATE_COMPENSATED,
                   pb.SAGA_STATE_NEEDS_ATTENTION})
IN_FLIGHT = frozenset({pb.TASK_STATE_DISPATCHING, pb.TASK_STATE_RUNNING})
TOOK_EFFECT = frozenset({pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_UNKNOWN})
"""Action outcomes that are compensated (UNKNOWN: it may have taken effect)."""


def flat_steps(definition: pb.SagaDefinition) -> list[tuple[int, pb.StepDefinition]]:
    """Every step with its stage, in definition order (the order of Saga.steps)."""
    return [(i, step) for i, stage in enumerate(definition.stages) for step in stage.steps]


def task(saga: pb.Saga, step: int, phase: pb.Phase.ValueType) -> pb.Task:
    s = saga.steps[step]
    return s.action if phase == pb.PHASE_ACTION else s.compensation


def new_record(saga_id: str, definition: pb.SagaDefinition, version: int, data: bytes,
               tenant: str) -> spb.SagaRecord:
    """A saga about to start (the primary's half of StartSaga)."""
    record = spb.SagaRecord(definition=definition, tenant=tenant)
    saga = record.saga
    saga.saga_id, saga.type, saga.version, saga.input = saga_id, definition.name, version, data
    saga.state = pb.SAGA_STATE_RUNNING
    for stage, step in flat_steps(definition):
        saga.steps.add(name=step.name, stage=stage,
                       action=pb.Task(state=pb.TASK_STATE_WAITING),
                       compensation=pb.Task(state=pb.TASK_STATE_WAITING))
    return record


def _note(saga: pb.Saga, now_ns: int, kind: str, step: str = "", job_id: str = "",
          detail: str = "") -> None:
    entry = saga.history.add(index=len(saga.history) + 1, kind=kind, step=step,
                             job_id=job_id, detail=detail)
    entry.time.FromNanoseconds(now_ns)


def begin(record: spb.SagaRecord, now_ns: int) -> None:
    """The saga starts: its first stage is dispatched."""
    saga = record.saga
    saga.start_time.FromNanoseconds(now_ns)
    _note(saga, now_ns, "started", detail=f"version {saga.version}")
    _advance(record, now_ns)


def dispatched(record: spb.SagaRecord, step: int, phase: pb.Phase.ValueType, job_id: str,
               now_ns: int) -> bool:
    """A task's job was enqueued; False if the task was not waiting for one."""
    saga = record.saga
    if step >= len(saga.steps):
        return False
    t = task(saga, step, phase)
    if t.state != pb.TASK_STATE_DISPATCHING:
        return False
    t.state, t.job_id = pb.TASK_STATE_RUNNING, job_id
    kind = "step_dispatched" if phase == pb.PHASE_ACTION else "compensation_dispatched"
    _note(saga, now_ns, kind, saga.steps[step].name, job_id)
    return True


def ended(record: spb.SagaRecord, change: spb.TaskEnded, now_ns: int) -> bool:
    """A task's job ended (or its step timed out), or, without a job id, the
    scheduler refused the job of a task being dispatched; False for a stale
    report (the task is not running that job, or not being dispatched, any more)."""
    saga = record.saga
    if change.step >= len(saga.steps):
        return False
    step = saga.steps[change.step]
    t = task(saga, change.step, change.phase)
    expected = pb.TASK_STATE_RUNNING if change.job_id else pb.TASK_STATE_DISPATCHING
    if t.state != expected or t.job_id != change.job_id:
        return False
    t.end_time.FromNanoseconds(now_ns)
    t.error = change.error
    if change.phase == pb.PHASE_ACTION:
        t.state = change.state
        if change.state == pb.TASK_STATE_SUCCEEDED:
            step.result = change.result
            _note(saga, now_ns, "step_succeeded", step.name, t.job_id)
        else:
            kind = "step_failed" if change.state == pb.TASK_STATE_FAILED else "step_unknown"
            _note(saga, now_ns, kind, step.name, t.job_id, change.error)
            if saga.state == pb.SAGA_STATE_RUNNING:
                saga.state = pb.SAGA_STATE_COMPENSATING
                saga.error = f"step {step.name!r}: {change.error}"
                _note(saga, now_ns, "compensating", step.name, detail=saga.error)
    elif change.state == pb.TASK_STATE_SUCCEEDED:
        t.state = pb.TASK_STATE_SUCCEEDED
        _note(saga, now_ns, "compensation_succeeded", step.name, t.job_id)
    else:
        t.state = pb.TASK_STATE_FAILED
        _note(saga, now_ns, "compensation_failed", step.name, t.job_id, change.error)
    _advance(record, now_ns)
    return True


def cancel(record: spb.SagaRecord, reason: str, now_ns: int) -> bool:
    """CancelSaga: a running saga starts compensating; False if it was not running."""
    saga = record.saga
    if saga.state != pb.SAGA_STATE_RUNNING:
        return False
    saga.cancel_requested = True
    saga.state = pb.SAGA_STATE_COMPENSATING
    saga.error = f"cancelled: {reason}" if reason else "cancelled"
    _note(saga, now_ns, "cancel_requested", detail=reason)
    _note(saga, now_ns, "compensating", detail=saga.error)
    _advance(record, now_ns)
    return True


def _advance(record: spb.SagaRecord, now_ns: int) -> None:
    saga = record.saga
    if saga.state == pb.SAGA_STATE_RUNNING:
        _run_next_stage(record, now_ns)
    elif saga.state == pb.SAGA_STATE_COMPENSATING:
        _compensate_next_stage(record, now_ns)


def _run_next_stage(record: spb.SagaRecord, now_ns: int) -> None:
    saga = record.saga
    pending = [s for s in saga.steps if s.action.state != pb.TASK_STATE_SUCCEEDED]
    if not pending:
        saga.state = pb.SAGA_STATE_COMPLETED
        saga.end_time.FromNanoseconds(now_ns)
        _note(saga, now_ns, "completed")
        return
    stage = min(s.stage for s in pending)
    for s in pending:
        if s.stage == stage and s.action.state == pb.TASK_STATE_WAITING:
            s.action.state = pb.TASK_STATE_DISPATCHING
            s.action.start_time.FromNanoseconds(now_ns)


def _compensate_next_stage(record: spb.SagaRecord, now_ns: int) -> None:
    saga = record.saga
    if any(s.action.state in IN_FLIGHT for s in saga.steps):
        return  # a stage's actions all end before anything is undone
    has_compensation = [step.HasField("compensation")
                        for _, step in flat_steps(record.definition)]
    for s, compensable in zip(saga.steps, has_compensation, strict=True):
        if s.compensation.state == pb.TASK_STATE_WAITING and (
                not compensable or s.action.state not in TOOK_EFFECT):
            s.compensation.state = pb.TASK_STATE_SKIPPED
    waiting = [s for s in saga.steps if s.compensation.state == pb.TASK_STATE_WAITING]
    if any(s.compensation.state in IN_FLIGHT for s in saga.steps):
        return  # the stage being undone is not done yet
    failed = [s for s in saga.steps if s.compensation.state == pb.TASK_STATE_FAILED]
    if failed:
        # Undoing an earlier stage could depend on this one being undone: stop,
        # and leave it to a person (the error says which step and why).
        first = failed[0]
        saga.state = pb.SAGA_STATE_NEEDS_ATTENTION
        saga.error = f"compensation of step {first.name!r} failed: {first.compensation.error}"
        saga.end_time.FromNanoseconds(now_ns)
        _note(saga, now_ns, "needs_attention", first.name, detail=saga.error)
        return
    if not waiting:
        saga.state = pb.SAGA_STATE_COMPENSATED
        saga.end_time.FromNanoseconds(now_ns)
        _note(saga, now_ns, "compensated", detail=saga.error)
        return
    stage = max(s.stage for s in waiting)
    for s in waiting:
        if s.stage == stage:
            s.compensation.state = pb.TASK_STATE_DISPATCHING
            s.compensation.start_time.FromNanoseconds(now_ns)
