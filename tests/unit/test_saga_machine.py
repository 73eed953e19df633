"""Sagas without a network: the rules that move a saga (stages, compensation in
reverse, parallel siblings, unknown outcomes, NEEDS_ATTENTION, cancel), how a
job's final state reads as a step's outcome, the machine's replay on a replica,
its snapshot and its copy on disk. Time is a `ManualClock` (it stamps the
commands)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any, cast

import grpc
import pytest

from common.clock import SECOND, ManualClock
from common.errors import MeshStatusError
from mesh.saga.v1 import saga_pb2 as pb
from mesh.saga.v1 import saga_replication_pb2 as spb
from mesh.scheduler.v1 import scheduler_pb2 as schedpb
from nodes.config import SagaLimits
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.replication.machine import Clear, Persist, Write
from nodes.saga import progress
from nodes.saga.driver import job_outcome, request_id, step_task
from nodes.saga.machine import SAGA, SagaMachine
from nodes.saga.service import SagaService
from nodes.saga.storage import SCHEMA, Storage
from tests.fakes import FakeJournal, Here
from tests.unit.test_replication_group import acked, replica_of

SUCCEEDED, FAILED, UNKNOWN = pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_UNKNOWN
ACTION, COMPENSATION = pb.PHASE_ACTION, pb.PHASE_COMPENSATION


def _definition(*stages: list[str], undo: bool = True) -> pb.SagaDefinition:
    d = pb.SagaDefinition(name="order")
    for names in stages:
        stage = d.stages.add()
        for name in names:
            step = stage.steps.add(name=name)
            step.action.queue, step.action.type = "q", f"order.{name}"
            if undo:
                step.compensation.queue, step.compensation.type = "q", f"order.{name}.undo"
    return d


def _record(*stages: list[str], undo: bool = True) -> spb.SagaRecord:
    record = progress.new_record("s1", _definition(*stages, undo=undo), 1, b"{}", "")
    progress.begin(record, 1)
    return record


def _states(record: spb.SagaRecord, phase: int = ACTION) -> dict[str, int]:
    return {s.name: (s.action if phase == ACTION else s.compensation).state
            for s in record.saga.steps}


def _run_and_end(record: spb.SagaRecord, step: int, state: int, phase: int = ACTION,
                 result: bytes = b"ok") -> None:
    job = f"job-{step}-{phase}"
    assert progress.dispatched(record, step, phase, job, 2)  # type: ignore[arg-type]
    assert progress.ended(record, spb.TaskEnded(
        saga_id="s1", step=step, phase=phase, job_id=job, state=state,  # type: ignore[arg-type]
        result=result, error="" if state == SUCCEEDED else "boom"), 3)


def test_stages_run_in_order_and_the_saga_completes() -> None:
    record = _record(["a"], ["b", "c"], ["d"])
    assert _states(record) == {"a": pb.TASK_STATE_DISPATCHING, "b": pb.TASK_STATE_WAITING,
                               "c": pb.TASK_STATE_WAITING, "d": pb.TASK_STATE_WAITING}
    _run_and_end(record, 0, SUCCEEDED)
    assert _states(record)["b"] == _states(record)["c"] == pb.TASK_STATE_DISPATCHING
    _run_and_end(record, 1, SUCCEEDED)
    assert _states(record)["d"] == pb.TASK_STATE_WAITING  # c still runs
    _run_and_end(record, 2, SUCCEEDED)
    _run_and_end(record, 3, SUCCEEDED)
    assert record.saga.state == pb.SAGA_STATE_COMPLETED
    assert [h.kind for h in record.saga.history][-1] == "completed"
    assert [h.index for h in record.saga.history] == list(range(1, len(record.saga.history) + 1))


def test_a_failure_compensates_completed_steps_last_stage_first() -> None:
    record = _record(["a"], ["b", "c"], ["d"])
    _run_and_end(record, 0, SUCCEEDED)
    _run_and_end(record, 1, SUCCEEDED)
    _run_and_end(record, 2, SUCCEEDED)
    _run_and_end(record, 3, FAILED)
    assert record.saga.state == pb.SAGA_STATE_COMPENSATING
    comp = _states(record, COMPENSATION)
    assert comp == {"a": pb.TASK_STATE_WAITING, "b": pb.TASK_STATE_DISPATCHING,
                    "c": pb.TASK_STATE_DISPATCHING, "d": pb.TASK_STATE_SKIPPED}
    _run_and_end(record, 1, SUCCEEDED, COMPENSATION)
    assert _states(record, COMPENSATION)["a"] == pb.TASK_STATE_WAITING
    _run_and_end(record, 2, SUCCEEDED, COMPENSATION)
    assert _states(record, COMPENSATION)["a"] == pb.TASK_STATE_DISPATCHING
    _run_and_end(record, 0, SUCCEEDED, COMPENSATION)
    assert record.saga.state == pb.SAGA_STATE_COMPENSATED
    assert "step 'd'" in record.saga.error


def test_a_failing_sibling_waits_for_the_rest_of_its_stage() -> None:
    record = _record(["a"], ["b", "c"])
    _run_and_end(record, 0, SUCCEEDED)
    _run_and_end(record, 1, FAILED)
    # c still runs: nothing is undone until it ends.
    assert _states(record, COMPENSATION) == {n: pb.TASK_STATE_WAITING for n in "abc"}
    _run_and_end(record, 2, UNKNOWN)
    comp = _states(record, COMPENSATION)
    assert comp == {"a": pb.TASK_STATE_WAITING, "b": pb.TASK_STATE_SKIPPED,
                    "c": pb.TASK_STATE_DISPATCHING}  # unknown: it may have taken effect
    task = step_task(record, 2, COMPENSATION)
    assert task.action_state == UNKNOWN and task.idempotency_key == "s1/c/compensation"
    assert dict(task.results) == {"a": b"ok"}


def test_a_compensation_that_fails_parks_the_saga_once_its_stage_ended() -> None:
    record = _record(["a"], ["b", "c"], ["d"])
    for step in (0, 1, 2):
        _run_and_end(record, step, SUCCEEDED)
    _run_and_end(record, 3, FAILED)
    _run_and_end(record, 1, FAILED, COMPENSATION)
    assert record.saga.state == pb.SAGA_STATE_COMPENSATING  # c's compensation runs
    _run_and_end(record, 2, SUCCEEDED, COMPENSATION)
    assert record.saga.state == pb.SAGA_STATE_NEEDS_ATTENTION
    assert record.saga.error == "compensation of step 'b' failed: boom"
    assert _states(record, COMPENSATION)["a"] == pb.TASK_STATE_WAITING  # never undone


def test_a_refused_job_fails_only_a_task_being_dispatched() -> None:
    """Without a job id, TaskEnded is the scheduler's refusal of a task's job: it
    ends a task in DISPATCHING, and is stale for one already running a job."""
    record = _record(["a"], ["b"])
    refused = spb.TaskEnded(saga_id="s1", step=0, phase=ACTION, state=FAILED,
                            error="the scheduler refused its job: payload: too big")
    assert progress.ended(record, refused, 2)
    assert record.saga.state == pb.SAGA_STATE_COMPENSATED  # nothing ran: nothing to undo
    assert _states(record) == {"a": FAILED, "b": pb.TASK_STATE_WAITING}
    assert record.saga.error == "step 'a': the scheduler refused its job: payload: too big"
    running = _record(["a"])
    assert progress.dispatched(running, 0, ACTION, "ja", 2)
    assert not progress.ended(running, refused, 3)  # a late refusal: the job exists
    assert _states(running) == {"a": pb.TASK_STATE_RUNNING}


def test_steps_without_compensation_and_cancel() -> None:
    record = _record(["a"], ["b"], undo=False)
    _run_and_end(record, 0, SUCCEEDED)
    assert progress.cancel(record, "no", 5)
    assert not progress.cancel(record, "again", 6)
    # b is running: the saga waits for it (the driver cancels its job).
    assert record.saga.state == pb.SAGA_STATE_COMPENSATING
    assert progress.dispatched(record, 1, ACTION, "jb", 6)
    assert not progress.ended(record, spb.TaskEnded(
        saga_id="s1", step=1, phase=ACTION, job_id="other", state=SUCCEEDED), 7)  # stale
    assert progress.ended(record, spb.TaskEnded(
        saga_id="s1", step=1, phase=ACTION, job_id="jb", state=FAILED, error="x"), 7)
    assert record.saga.state == pb.SAGA_STATE_COMPENSATED  # nothing to undo
    assert _states(record, COMPENSATION) == {"a": pb.TASK_STATE_SKIPPED,
                                             "b": pb.TASK_STATE_SKIPPED}
    assert record.saga.error == "cancelled: no"


def _job(state: int, *outcomes: int) -> schedpb.Job:
    job = schedpb.Job(state=state, last_error="e")  # type: ignore[arg-type]
    for outcome in outcomes:
        job.attempts.add(outcome=outcome)
    return job


def test_a_jobs_final_state_reads_as_an_outcome() -> None:
    J, A = schedpb, schedpb
    assert job_outcome(_job(J.JOB_STATE_LEASED, A.ATTEMPT_OUTCOME_RUNNING)) is None
    assert job_outcome(_job(J.JOB_STATE_SUCCEEDED))[0] == SUCCEEDED  # type: ignore[index]
    assert job_outcome(_job(J.JOB_STATE_DEAD, A.ATTEMPT_OUTCOME_FAILED,
                            A.ATTEMPT_OUTCOME_FAILED))[0] == FAILED  # type: ignore[index]
    # A lost lease or a timed-out attempt may have taken effect.
    assert job_outcome(_job(J.JOB_STATE_DEAD, A.ATTEMPT_OUTCOME_LEASE_EXPIRED,
                            A.ATTEMPT_OUTCOME_FAILED))[0] == UNKNOWN  # type: ignore[index]
    assert job_outcome(_job(J.JOB_STATE_DEAD, A.ATTEMPT_OUTCOME_TIMED_OUT))[0] == UNKNOWN  # type: ignore[index]
    assert job_outcome(_job(J.JOB_STATE_CANCELLED, A.ATTEMPT_OUTCOME_ABANDONED))[0] == FAILED  # type: ignore[index]
    assert job_outcome(_job(J.JOB_STATE_CANCELLED, A.ATTEMPT_OUTCOME_CANCELLED))[0] == UNKNOWN  # type: ignore[index]
    assert request_id("s1", "a", ACTION) != request_id("s1", "a", COMPENSATION)


def _group(clock: ManualClock, journal: FakeJournal, primary: bool = True) -> Group:
    group = Group(5, "n", {SAGA: lambda g: SagaMachine(g, journal)}, clock=clock,
                  journal=journal)
    if primary:
        group.become_primary(2)
    return group


def _machine(group: Group) -> SagaMachine:
    machine = group.machines[SAGA]
    assert isinstance(machine, SagaMachine)
    return machine


def _propose(group: Group, command: spb.SagaCommand) -> object:
    return group.propose(0, SAGA, command.SerializeToString()).result


def test_replicas_replay_to_the_same_state_and_snapshots_restore_it() -> None:
    clock = ManualClock(100 * SECOND)
    primary, replica = _group(clock, FakeJournal()), _group(clock, FakeJournal(), False)
    definition = _definition(["a"], ["b"])
    assert _propose(primary, spb.SagaCommand(registered=spb.TypeRegistered(
        definition=definition))) == 1
    record = progress.new_record("s1", definition, 1, b"in", "acme")
    _propose(primary, spb.SagaCommand(started=spb.SagaStarted(record=record)))
    clock.advance(SECOND)
    _propose(primary, spb.SagaCommand(dispatched=spb.TaskDispatched(
        saga_id="s1", step=0, phase=ACTION, job_id="j0")))
    _propose(primary, spb.SagaCommand(ended=spb.TaskEnded(
        saga_id="s1", step=0, phase=ACTION, job_id="j0", state=SUCCEEDED, result=b"r")))
    _propose(primary, spb.SagaCommand(published=spb.HistoryPublished(saga_id="s1", up_to=2)))
    for command in primary.log.since(0, 1000):
        _machine(replica).apply(command)
    mine, theirs = _machine(primary), _machine(replica)
    assert mine.sagas["s1"] == theirs.sagas["s1"]
    assert mine.sagas["s1"].published == 2 and mine.unpublished == {"s1"}
    assert mine.sagas["s1"].saga.history[1].time.ToNanoseconds() == 101 * SECOND
    assert mine.active == theirs.active == {"s1"}
    assert mine.type_version("order", 0) == (definition, 1)
    assert mine.type_version("order", 2) is None

    fresh = _group(clock, FakeJournal(), False)
    _machine(fresh).restore(mine.snapshot())
    assert _machine(fresh).sagas == mine.sagas and _machine(fresh).types == mine.types
    assert _machine(fresh).active == {"s1"}

    _propose(primary, spb.SagaCommand(forgotten=spb.SagasForgotten(saga_ids=["s1", "nope"])))
    assert not mine.sagas and not mine.active and not mine.unpublished


def test_the_disk_copy_reads_back() -> None:
    """The rows a snapshot install and later changes write, in a real sqlite
    database with the service's schema, read back as the same state."""
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)

    def run(writes: list[Persist] | list[Write]) -> None:
        for w in writes:
            if isinstance(w, Clear):
                for table in w.tables:
                    db.execute(f"DELETE FROM {table} WHERE group_id = 5")
            else:
                db.executemany(w.sql, w.rows)

    storage = Storage(5)
    record = progress.new_record("s1", _definition(["a"]), 1, b"", "")
    other = progress.new_record("s2", _definition(["a"]), 1, b"", "")
    types = spb.TypeRecord(name="order", versions=[_definition(["a"])])
    run(storage.replace([record, other], [types]))
    progress.begin(record, 7)
    run([storage.saga(record), storage.forgotten(["s2"])])

    class Reader:
        def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
            return db.execute(sql, params).fetchall()

    sagas, found = storage.load(Reader())
    assert sagas == [record] and found == [types]


def _finish(group: Group, clock: ManualClock, saga_id: str) -> None:
    """Start a one-step saga and run it to COMPLETED (ending at the clock's time)."""
    record = progress.new_record(saga_id, _definition(["a"], undo=False), 1, b"", "")
    _propose(group, spb.SagaCommand(started=spb.SagaStarted(record=record)))
    _propose(group, spb.SagaCommand(dispatched=spb.TaskDispatched(
        saga_id=saga_id, step=0, phase=ACTION, job_id=f"j-{saga_id}")))
    _propose(group, spb.SagaCommand(ended=spb.TaskEnded(
        saga_id=saga_id, step=0, phase=ACTION, job_id=f"j-{saga_id}", state=SUCCEEDED)))
    assert _machine(group).sagas[saga_id].saga.state == pb.SAGA_STATE_COMPLETED


def test_the_retention_sweep_takes_only_the_sagas_that_expired_oldest_first() -> None:
    """The primary's sweep finds the sagas past their retention in a heap by end
    time: what has not expired is not looked at, a saga is taken once, a saga
    that ends later is found too; a replica, which never sweeps, drops the
    entries of what the primary forgot (its heap does not grow for ever)."""
    clock = ManualClock(100 * SECOND)
    primary, replica = _group(clock, FakeJournal()), _group(clock, FakeJournal(), False)
    machine = _machine(primary)
    for i in range(5):  # s0 ends at 100 s, s1 at 101 s, ...
        _finish(primary, clock, f"s{i}")
        clock.advance(SECOND)
    running = progress.new_record("r", _definition(["a"]), 1, b"", "")
    _propose(primary, spb.SagaCommand(started=spb.SagaStarted(record=running)))

    assert machine.ended_before(99 * SECOND, 10) == []
    assert machine.ended_before(102 * SECOND, 2) == ["s0", "s1"]  # oldest first, 2 at most
    assert machine.ended_before(102 * SECOND, 10) == ["s2"]  # each taken once
    _finish(primary, clock, "late")  # ends at 105 s
    assert machine.ended_before(105 * SECOND, 10) == ["s3", "s4", "late"]
    assert machine.ended_before(10**6 * SECOND, 10) == []  # "r" is still running

    _propose(primary, spb.SagaCommand(forgotten=spb.SagasForgotten(
        saga_ids=["s0", "s1", "s2"])))
    for command in primary.log.since(0, 1000):
        _machine(replica).apply(command)
    theirs = _machine(replica)
    assert set(theirs.sagas) == {"s3", "s4", "late", "r"}
    assert sorted(saga_id for _, saga_id in theirs._ended) == ["late", "s3", "s4"]
    assert theirs.ended_before(10**6 * SECOND, 10) == ["s3", "s4", "late"]


def test_the_service_forgets_the_sagas_past_their_retention() -> None:
    clock = ManualClock(100 * SECOND)
    primary = _group(clock, FakeJournal())
    for i in range(3):  # s0 ends at 100 s, s1 at 101 s, s2 at 102 s
        _finish(primary, clock, f"s{i}")
        clock.advance(SECOND)
    service = SagaService(SagaLimits(retention=10.0), cast(Journal, FakeJournal()), clock)
    service.tick(primary, 111 * SECOND)
    assert set(_machine(primary).sagas) == {"s2"}
    service.tick(primary, 113 * SECOND)
    assert not _machine(primary).sagas


def _serving(clock: ManualClock) -> tuple[SagaService, Group]:
    """A saga service leading one group, with saga ``s1`` running in it."""
    journal = FakeJournal()
    service = SagaService(SagaLimits(), cast(Journal, journal), clock)
    group = Group(5, "n", {SAGA: service.machine}, clock=clock, journal=journal)
    group.become_primary(2)
    service.start_routing(Here(group))  # type: ignore[arg-type]
    definition = _definition(["a"])
    _propose(group, spb.SagaCommand(registered=spb.TypeRegistered(definition=definition)))
    _propose(group, spb.SagaCommand(started=spb.SagaStarted(
        record=progress.new_record("s1", definition, 1, b"in", "acme"))))
    return service, group


async def test_a_get_saga_waiting_on_a_group_that_leaves_ends_at_once_to_be_retried() -> None:
    """It waited out its whole wait, then failed INTERNAL on the emptied copy."""
    service, group = _serving(ManualClock(100 * SECOND))
    context: Any = None
    request = pb.GetSagaRequest(saga_id="s1")
    request.wait.FromSeconds(60)
    call = asyncio.ensure_future(service.GetSaga(request, context))
    await asyncio.sleep(0)
    assert not call.done()  # the saga runs: it waits for its end
    group.close("the map moved the group to another node")
    with pytest.raises(MeshStatusError) as info:
        await asyncio.wait_for(call, 5)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.reason == "GROUP_UNAVAILABLE"


async def test_a_cancel_whose_group_leaves_as_it_commits_is_answered() -> None:
    """The cancel took effect: it must not be reported as something to retry."""
    service, group = _serving(ManualClock(100 * SECOND))
    tracker = replica_of(group)
    context: Any = None
    call = asyncio.ensure_future(service.CancelSaga(pb.CancelSagaRequest(saga_id="s1"), context))
    await asyncio.sleep(0)
    assert not call.done()  # waits for the replica
    acked(tracker)
    group.close("the map moved the group to another node")
    answer = await asyncio.wait_for(call, 5)
    assert answer.saga.state == pb.SAGA_STATE_COMPENSATING and answer.saga.cancel_requested


async def test_get_saga_answers_what_it_read_once_that_is_committed() -> None:
    """A change made while GetSaga waits for the saga as read to commit (here a
    cancel) is not in its answer: it is not committed when the answer is."""
    service, group = _serving(ManualClock(100 * SECOND))
    tracker = replica_of(group)
    _propose(group, spb.SagaCommand(dispatched=spb.TaskDispatched(
        saga_id="s1", step=0, phase=ACTION, job_id="j0")))  # not yet committed
    context: Any = None
    call = asyncio.ensure_future(service.GetSaga(pb.GetSagaRequest(saga_id="s1"), context))
    await asyncio.sleep(0)
    assert not call.done()  # waits for the dispatch it read to commit
    read_at = group.log.last_seq
    _propose(group, spb.SagaCommand(cancel=spb.CancelRequested(saga_id="s1")))
    acked(tracker, read_at)
    answer = await asyncio.wait_for(call, 1)
    assert answer.saga.state == pb.SAGA_STATE_RUNNING and not answer.saga.cancel_requested
    assert answer.saga.steps[0].action.job_id == "j0"
