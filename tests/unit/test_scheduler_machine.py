"""The scheduler's state machine without a network: decisions on a primary, replay
on a replica, leases and tokens, retries, unique keys, the primary's timers,
snapshots, and reading back from a real journal. Time is a `ManualClock` per group:
the tests pass the instants they mean, or advance it."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.clock import MILLISECOND, ManualClock
from common.errors import MeshStatusError, ServiceError
from common.slots import slot_for
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.config import SchedulerLimits
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.scheduler import machine as machine_module
from nodes.scheduler import validation as v
from nodes.scheduler.claims import Claimed, ClaimWaiter, Room, claim
from nodes.scheduler.decisions import Enqueued, Next
from nodes.scheduler.leader import Leader
from nodes.scheduler.machine import SCHEDULER, SchedulerMachine
from nodes.scheduler.model import (
    DEAD,
    LEASED,
    MAX_HISTORY,
    SUCCEEDED,
    WAITING,
    Backoff,
    Job,
    shared_backoff,
)
from nodes.scheduler.service import SchedulerService
from nodes.scheduler.state import EPOCH_SHIFT, SchedulerState
from nodes.scheduler.storage import SCHEMA, TABLES
from tests.fakes import FakeJournal, Here
from tests.unit.test_replication_group import acked, replica_of

S = 1_000_000_000
LIMITS = SchedulerLimits()


def _group(journal: Any, node: str = "a", primary: bool = True, durable: Any = None,
           limits: SchedulerLimits = LIMITS, epoch: int = 1,
           clock: ManualClock | None = None) -> Group:
    clock = clock or ManualClock()
    group = Group(5, node, {SCHEDULER: lambda g: SchedulerMachine(g, journal, limits, clock)},
                  durable=durable, clock=clock, journal=journal)
    if isinstance(journal, Journal):
        journal.on_flushed = lambda ticket, _groups: group.mark_flushed(ticket)
    if primary:
        group.become_primary(epoch)
    return group


def _machine(group: Group) -> SchedulerMachine:
    machine = group.machines[SCHEDULER]
    assert isinstance(machine, SchedulerMachine)
    return machine


def _leader(m: SchedulerMachine) -> Leader:
    assert m.leader is not None
    return m.leader


def _due(m: SchedulerMachine, wall_ns: int) -> None:
    """Let ``m``'s clock reach ``wall_ns`` (time passing), then run the primary's
    timers' work as they would."""
    clock = m.clock
    assert isinstance(clock, ManualClock)
    clock.set(wall_ns)
    _leader(m).run_due()


def _enqueue(m: SchedulerMachine, queue: str = "q", strict: bool = False, **fields: Any
             ) -> str:
    now = m.clock.wall_ns()
    spec = v.job_spec(pb.EnqueueRequest(queue=queue, type="t", **fields), LIMITS, now)
    return m.decisions.enqueue(spec, strict, now).job_id


def _enqueue_request(m: SchedulerMachine, request_id: str, queue: str = "q",
                     **fields: Any) -> Enqueued:
    now = m.clock.wall_ns()
    spec = v.job_spec(pb.EnqueueRequest(queue=queue, type="t", request_id=request_id,
                                        **fields), LIMITS, now)
    return m.decisions.enqueue(spec, False, now, request_id)


def _claim(m: SchedulerMachine, *queues: str, n: int = 1, lease: float = 30,
           worker: str = "w", now: int | None = None, room: int = 24 << 20
           ) -> list[Claimed]:
    sources = [(m, m.state.queues[q]) for q in queues or ("q",) if q in m.state.queues]
    return claim(sources, worker, n, int(lease * S), now or m.clock.wall_ns(), _room(room))


def _room(size: int = 24 << 20) -> Room:
    return Room(size)


def _one(m: SchedulerMachine, **kwargs: Any) -> tuple[str, int]:
    (claimed,) = _claim(m, **kwargs)
    (job,) = claimed.jobs
    return job.job_id, claimed.token


def _replay(primary: Group, replica: Group, after: int = 0) -> None:
    for command in primary.log.since(after, 100_000):
        _machine(replica).apply(command)


def _state(m: SchedulerMachine) -> Any:
    """Everything a copy holds, comparable across copies (index places aside)."""
    jobs = sorted(j.to_record().SerializeToString() for j in m.state.jobs.values())
    schedules = sorted(s.record.SerializeToString() for s in m.state.schedules.values())
    queues = sorted((q.name, q.totals.succeeded, q.totals.failed_attempts,
                     q.totals.lease_losses, q.n_ready + q.n_delayed, sorted(q.leased),
                     q.n_done, q.n_cancelled, q.dead,
                     sorted((k, j.job_id) for k, j in q.unique.items() if not j.finished),
                     sorted((k, r[0], r[1]) for k, r in q.requests.items()))
                    for q in m.state.queues.values())
    return jobs, schedules, queues


def _untracked(m: SchedulerMachine) -> None:
    """The garbage collector leaves every finished job and request id alone (see
    `nodes.scheduler.table`). A collection untracks a tuple once what it holds is
    untracked, one level per pass: a frozen job holds its attempts, which hold
    each attempt (in a node, the young generations' passes do the inner levels)."""
    for _ in range(3):
        gc.collect()
    finished = list(m.state.jobs._finished.values())
    queues = m.state.queues.values()
    requests = [r for q in queues for r in q.requests.values()]
    entries = [e for q in queues for heap in (*q.ready, q.delayed) for e in heap]
    assert finished and not any(gc.is_tracked(f) for f in finished)
    assert not any(gc.is_tracked(r) for r in requests)
    assert not any(gc.is_tracked(e) for e in entries)  # a backlog's index entries
    live = list(m.state.jobs.live())
    assert all(not j.finished for j in live)
    # A waiting job is one object: its backoff is shared, its attempts (none yet) ().
    assert all(not gc.is_tracked(j.attempts) for j in live if not j.attempts)
    assert len({id(j.backoff) for j in live}) <= len({j.backoff for j in live})


def test_claim_order_priority_then_run_time_then_fifo_and_replicas_agree() -> None:
    primary, replica = _group(FakeJournal()), _group(FakeJournal(), "b", primary=False)
    m = _machine(primary)
    ids = {p: _enqueue(m, priority=p, payload=str(p).encode()) for p in (1, 5, 0, 9)}
    second_five = _enqueue(m, priority=5)
    delayed = _enqueue(m, priority=9, delay={"seconds": 60})
    other = _enqueue(m, "r", priority=7)
    assert all(slot_for(i) == slot_for("q") for i in ids.values())  # ids route to the queue
    claimed = _claim(m, "q", "r", n=10)
    order = [j.job_id for c in claimed for j in c.jobs]
    assert order == [ids[9], other, ids[5], second_five, ids[1], ids[0]]
    assert delayed not in order
    (lease,) = claimed
    assert lease.token == 1 << EPOCH_SHIFT | lease.seq  # epoch 1, the claim's seq
    _replay(primary, replica)
    assert _state(_machine(replica)) == _state(m)
    # Due now: the delayed job is next, on the primary's clock.
    (later,) = _claim(m, now=m.clock.wall_ns() + 61 * S)
    assert [j.job_id for j in later.jobs] == [delayed] and later.token > lease.token


def test_tokens_are_checked_and_a_repeated_complete_or_fail_gets_the_same_answer() -> None:
    m = _machine(_group(FakeJournal()))
    job_id = _enqueue(m)
    _, token = _one(m)
    for wrong in (token - 1, token + 1, 0):
        with pytest.raises(ServiceError) as exc:
            m.decisions.complete(job_id, wrong, b"")
        assert (exc.value.code, exc.value.reason.value) == (
            grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
        assert exc.value.metadata["state"] == "JOB_STATE_LEASED"
    job, _ = m.decisions.heartbeat(job_id, token, 60 * S)
    assert job.lease_ns == 60 * S
    finish, seq, _ = m.decisions.complete(job_id, token, b"ok")
    assert m.decisions.complete(job_id, token, b"ok") == (finish, seq, [])
    with pytest.raises(ServiceError):
        m.decisions.heartbeat(job_id, token, None)
    with pytest.raises(ServiceError) as exc:
        m.decisions.fail(job_id, token, "late", True, None)
    assert exc.value.metadata["state"] == "JOB_STATE_SUCCEEDED"
    other = _enqueue(m)
    _, token = _one(m)
    failed = m.decisions.fail(other, token, "e", True, None)
    assert m.decisions.fail(other, token, "e", True, None) == failed
    with pytest.raises(ServiceError) as exc:
        m.decisions.complete("{q}9-9", 1, b"")
    assert exc.value.reason.value == "JOB_NOT_FOUND"


def test_backoff_schedule_and_jitter() -> None:
    b = Backoff(initial_ns=S, max_ns=10 * S, multiplier=2, jitter=0)
    assert [b.delay_ns(n, 0.99) for n in range(1, 7)] == [S, 2 * S, 4 * S, 8 * S, 10 * S,
                                                          10 * S]
    jittered = Backoff(initial_ns=S, max_ns=10 * S, multiplier=3, jitter=0.5)
    assert jittered.delay_ns(2, 0.0) == 3 * S and jittered.delay_ns(2, 0.5) == 9 * S // 4
    assert Backoff(S, S, 1, 0).delay_ns(50, 0.3) == S  # constant


def test_failures_retry_with_backoff_then_die_and_requeue_resets_the_budget() -> None:
    m = _machine(_group(FakeJournal()))
    backoff = pb.Backoff(multiplier=2)
    backoff.initial_delay.FromMilliseconds(100)
    job_id = _enqueue(m, max_attempts=3, backoff=backoff)
    job = m.state.jobs[job_id]
    delays = []
    for attempt in (1, 2):
        start = m.clock.wall_ns()
        _, token = _one(m, now=start + 10 * S)
        assert job.attempt_count == attempt
        failed = m.decisions.fail(job_id, token, f"e{attempt}", True, None)
        assert failed.state == WAITING and failed.attempts == attempt
        delays.append(failed.run_ns - start)
    assert 0.1 * S <= delays[0] < 0.11 * S and 0.2 * S <= delays[1] < 0.21 * S
    _, token = _one(m, now=m.clock.wall_ns() + 10 * S)
    assert m.decisions.fail(job_id, token, "e3", True, None).state == DEAD
    queue = m.state.queues["q"]
    assert queue.dead == [(job.finish_ns, job_id)] and queue.totals.failed_attempts == 3
    assert (job.last_error, [a.number for a in job.attempts]) == ("e3", [1, 2, 3])
    thawed = m.state.jobs[job_id]  # frozen while dead: every field comes back
    assert thawed is not job and thawed.to_record() == job.to_record()
    assert (thawed.seq, thawed.backoff, thawed.attempts) == (job.seq, job.backoff, job.attempts)
    assert Job.thawed(thawed.frozen()).frozen() == thawed.frozen()
    assert m.decisions.requeue("q", [])[:2] == (1, 0)
    job = m.state.jobs[job_id]  # a finished job is kept frozen: requeued, a live one again
    assert job.state == WAITING and job.attempt_count == 0 and not queue.dead
    _, token = _one(m)
    assert m.decisions.fail(job_id, token, "fatal", False, None).state == DEAD  # not retryable
    assert m.decisions.purge("q", [], False)[:2] == (0, 1)
    assert m.decisions.purge("q", [job_id, "nope"], False)[:2] == (1, 0)
    assert job_id not in m.state.jobs


class _Ticking(ManualClock):
    """A clock that moves a microsecond at every reading, as a real one does."""

    reads = 0

    def wall_ns(self) -> int:
        self.reads += 1
        return super().wall_ns() + self.reads * 1_000


def test_a_retry_waits_its_whole_delay_from_the_failure_it_stamps() -> None:
    """The attempt's finish time is the instant its retry's delay counts from, so
    the next attempt can never start less than the delay after it."""
    m = _machine(_group(FakeJournal(), clock=_Ticking()))
    job_id = _enqueue(m, max_attempts=3)
    _, token = _one(m)
    failed = m.decisions.fail(job_id, token, "boom", True, 400 * MILLISECOND)
    (attempt,) = m.state.jobs[job_id].attempts
    assert failed.run_ns - attempt.finish_ns == 400 * MILLISECOND


def test_expired_leases_do_not_spend_attempts_but_are_capped() -> None:
    limits = SchedulerLimits(max_lease_losses=3)
    m = _machine(_group(FakeJournal(), limits=limits))
    job_id = _enqueue(m, max_attempts=1)
    job = m.state.jobs[job_id]
    tokens = []
    for losses in (1, 2, 3):
        start = m.clock.wall_ns()
        _, token = _one(m, lease=1, now=start)
        tokens.append(token)
        assert job.attempt_count == 1
        _due(m, start + 2 * S)
        assert job.lease_losses == losses and job.attempt_count == 0
        assert job.state == (DEAD if losses == 3 else WAITING)
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    outcomes = [a.outcome for a in job.attempts]
    assert outcomes == [pb.ATTEMPT_OUTCOME_LEASE_EXPIRED] * 3
    assert "3 times" in job.last_error
    assert m.state.queues["q"].totals.lease_losses == 3


def test_a_timeout_counts_as_a_failed_attempt() -> None:
    m = _machine(_group(FakeJournal()))
    job_id = _enqueue(m, max_attempts=2, timeout={"seconds": 2})
    job = m.state.jobs[job_id]
    start = m.clock.wall_ns()
    _one(m, lease=30, now=start)
    assert job.lease_expire_ns == job.timeout_at_ns  # the lease never passes the timeout
    _due(m, start + S)
    assert job.state == LEASED  # not yet
    _due(m, job.timeout_at_ns)
    assert job.state == WAITING and job.attempt_count == 1
    assert job.attempts[-1].outcome == pb.ATTEMPT_OUTCOME_TIMED_OUT
    _one(m, now=m.clock.wall_ns() + 60 * S)
    _due(m, job.timeout_at_ns)
    assert job.state == DEAD


def test_a_late_complete_after_the_deadline_is_refused_and_expires_the_lease() -> None:
    m = _machine(_group(FakeJournal()))
    job_id = _enqueue(m)
    job = m.state.jobs[job_id]
    _, token = _one(m, lease=1)
    clock = m.clock
    assert isinstance(clock, ManualClock)
    clock.advance(S)  # no loop here: its timer has not run
    with pytest.raises(ServiceError) as exc:
        m.decisions.complete(job_id, token, b"")
    assert exc.value.reason.value == "LEASE_LOST"
    assert job.state == WAITING and job.lease_losses == 1


def test_a_stepped_wall_clock_neither_ends_a_lease_early_nor_keeps_it_late() -> None:
    """NTP or an operator may step the wall clock either way. A lease runs for
    its length in elapsed time all the same: ended early, its job would go to a
    second worker while the first still runs it; kept late, a crashed worker's
    job would wait out the step."""
    async def scenario() -> None:
        clock = ManualClock()
        m = _machine(_group(FakeJournal(), clock=clock))
        job_id = _enqueue(m, timeout={"seconds": 60})
        job = m.state.jobs[job_id]
        _, token = _one(m, lease=10)
        clock.jump(3600 * S)  # an hour forward
        clock.advance(5 * S)  # the lease timer runs if it thinks it is due
        assert job.state == LEASED
        _, _ = m.decisions.heartbeat(job_id, token, None)  # still its lease: 10 s more
        assert job.lease_expire_ns == clock.wall_ns() + 10 * S  # what readers see
        clock.jump(-7200 * S)  # two hours back
        clock.advance(10 * S - MILLISECOND)
        assert job.state == LEASED
        clock.advance(MILLISECOND)  # 10 s after the heartbeat: the timer ends it
        assert job.state == WAITING and job.lease_losses == 1
        assert job.attempts[-1].outcome == pb.ATTEMPT_OUTCOME_LEASE_EXPIRED

    asyncio.run(scenario())


def test_an_attempt_timeout_counts_elapsed_time_across_a_wall_clock_step() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        m = _machine(_group(FakeJournal(), clock=clock))
        job_id = _enqueue(m, timeout={"seconds": 20}, max_attempts=1)
        job = m.state.jobs[job_id]
        _, token = _one(m, lease=30)  # capped at the timeout
        clock.jump(3600 * S)
        clock.advance(5 * S)
        m.decisions.heartbeat(job_id, token, None)  # 15 s of the attempt are left
        assert job.lease_expire_ns == clock.wall_ns() + 15 * S
        clock.jump(-7200 * S)
        clock.advance(15 * S - MILLISECOND)
        assert job.state == LEASED
        clock.advance(MILLISECOND)
        assert job.state == DEAD and job.attempts[-1].outcome == pb.ATTEMPT_OUTCOME_TIMED_OUT

    asyncio.run(scenario())


def test_an_abandoned_claim_puts_its_jobs_back_uncounted() -> None:
    m = _machine(_group(FakeJournal()))
    first, second = _enqueue(m), _enqueue(m)
    (claimed,) = _claim(m, n=2)
    m.decisions.abandon(claimed)
    jobs = m.state.jobs
    assert jobs[first].state == jobs[second].state == WAITING
    assert jobs[first].attempt_count == 0 and jobs[first].lease_losses == 0
    (again,) = _claim(m, n=2)
    assert [j.job_id for j in again.jobs] == [first, second]  # their places kept


def test_unique_keys() -> None:
    m = _machine(_group(FakeJournal()))
    first = _enqueue(m, unique_key="k")
    assert _enqueue(m, unique_key="k") == first
    with pytest.raises(ServiceError) as exc:
        _enqueue(m, unique_key="k", strict=True)
    assert (exc.value.code, exc.value.metadata["job_id"]) == (
        grpc.StatusCode.ALREADY_EXISTS, first)
    assert _enqueue(m, "other", unique_key="k") != first  # per queue
    _, token = _one(m)
    m.decisions.complete(first, token, b"")
    second = _enqueue(m, unique_key="k", strict=True)
    assert second != first
    m.decisions.cancel(second)
    third = _enqueue(m, unique_key="k", unique_ttl={"seconds": 1})
    job = m.state.jobs[third]
    job.unique_expire_ns = m.clock.wall_ns() - 1  # the ttl passed
    assert _enqueue(m, unique_key="k") not in (first, second, third)


def test_queue_full() -> None:
    m = _machine(_group(FakeJournal(), limits=SchedulerLimits(max_queue_jobs=2)))
    _enqueue(m)
    _enqueue(m)
    with pytest.raises(ServiceError) as exc:
        _enqueue(m)
    assert (exc.value.code, exc.value.reason.value) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")


def test_a_new_primary_gives_running_leases_a_full_lease_and_higher_tokens() -> None:
    clock = ManualClock()
    primary = _group(FakeJournal(), clock=clock)
    replica = _group(FakeJournal(), "b", primary=False, clock=clock)
    m = _machine(primary)
    job_id = _enqueue(m)
    _, token = _one(m, lease=5)
    _replay(primary, replica)
    promoted = m.clock.wall_ns()
    replica.become_primary(2)
    r = _machine(replica)
    job = r.state.jobs[job_id]
    assert job.lease_expire_ns >= promoted + 5 * S
    finish, _, _ = r.decisions.complete(job_id, token, b"")  # the worker's token still works
    assert finish and job.state == SUCCEEDED
    r.decisions.requeue("q", [])
    other = _enqueue(r)
    _, token2 = _one(r)
    assert token2 >> EPOCH_SHIFT == 2 and token2 > token
    assert other.startswith("{q}2-")  # ids carry the epoch too


def test_leading_again_rearms_every_lease_timer() -> None:
    group = _group(FakeJournal())
    m = _machine(group)
    job_id = _enqueue(m)
    _one(m, lease=1)
    group.step_down(2, "test")
    group.become_primary(3)
    _due(m, m.clock.wall_ns() + 3 * S)
    job = m.state.jobs[job_id]
    assert job.state == WAITING and job.lease_losses == 1


def test_stepping_down_ends_waiting_claims() -> None:
    async def scenario() -> None:
        group = _group(FakeJournal())
        m = _machine(group)
        waiter = ClaimWaiter("w", 1, 30 * S, _room())
        _leader(m).add_waiter(waiter, ["q"])
        group.step_down(2, "test")
        assert m.leader is None
        with pytest.raises(ServiceError) as exc:
            await waiter.future
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


async def test_waiters_are_served_in_order_when_jobs_come() -> None:
    clock = ManualClock()
    m = _machine(_group(FakeJournal(), clock=clock))
    first, second = ClaimWaiter("a", 5, 30 * S, _room()), ClaimWaiter("b", 5, 30 * S, _room())
    _leader(m).add_waiter(first, ["q"])
    _leader(m).add_waiter(second, ["q", "r"])
    job_id = _enqueue(m)
    got = await asyncio.wait_for(first.future, 1)
    assert [j.job_id for c in got for j in c.jobs] == [job_id]
    assert not second.done and not first.places
    delayed = _enqueue(m, "r", delay={"nanos": 50_000_000})
    clock.advance(49 * MILLISECOND)
    await asyncio.sleep(0)
    assert not second.done
    clock.advance(1 * MILLISECOND)
    got = await asyncio.wait_for(second.future, 1)  # the due timer wakes it
    assert [j.job_id for c in got for j in c.jobs] == [delayed]
    assert not _leader(m).waiters


def test_cron_fires_each_tick_once_with_catch_up_capped() -> None:
    limits = SchedulerLimits(cron_catch_up=3)
    primary, replica = _group(FakeJournal(), limits=limits), _group(
        FakeJournal(), "b", primary=False, limits=limits)
    m = _machine(primary)
    now = (m.clock.wall_ns() // S) * S
    request = pb.CreateScheduleRequest(queue="q", schedule_id="s", cron="* * * * * *",
                                       template=pb.JobTemplate(type="tick", unique_key=""))
    record = v.cron_spec(request, limits, now)
    assert record.next_fire_ns == now + S
    schedule, _ = m.decisions.put_schedule(record, False)
    _due(m, now + S)
    _due(m, now + S)  # the same tick again: nothing
    assert schedule.record.fired_total == 1 and schedule.record.last_tick_ns == now + S
    _due(m, now + 10 * S)  # 9 ticks missed: the 3 oldest fire, 6 are skipped
    r = schedule.record
    assert (r.fired_total, r.skipped_total, r.next_fire_ns) == (4, 6, now + 11 * S)
    runs = sorted(j.run_ns for j in m.state.jobs.values())
    assert runs == [now + S, now + 2 * S, now + 3 * S, now + 4 * S]
    assert {j.schedule_id for j in m.state.jobs.values()} == {"s"}
    # A new primary goes on after the last tick its copy holds: none twice.
    _replay(primary, replica)
    replica.become_primary(2)
    _due(_machine(replica), now + 11 * S)
    rr = _machine(replica).state.schedules[("q", "s")].record
    assert (rr.fired_total, rr.last_tick_ns) == (5, now + 11 * S)
    assert len({j.run_ns for j in _machine(replica).state.jobs.values()}) == 5


def test_cron_skips_a_tick_while_its_unique_key_is_held() -> None:
    m = _machine(_group(FakeJournal()))
    now = (m.clock.wall_ns() // S) * S
    request = pb.CreateScheduleRequest(queue="q", schedule_id="s", cron="* * * * * *",
                                       template=pb.JobTemplate(type="t", unique_key="one"))
    schedule, _ = m.decisions.put_schedule(v.cron_spec(request, LIMITS, now), False)
    _due(m, now + S)
    _due(m, now + 2 * S)
    assert (schedule.record.fired_total, schedule.record.skipped_total) == (1, 1)
    assert len(m.state.jobs) == 1


def test_retention_sweep_removes_finished_jobs() -> None:
    m = _machine(_group(FakeJournal()))
    done = _enqueue(m, retention={"seconds": 10})
    _, token = _one(m)
    m.decisions.complete(done, token, b"")
    dead = _enqueue(m)
    _, token = _one(m)
    m.decisions.fail(dead, token, "", False, None)
    kept = _enqueue(m)
    leader = _leader(m)
    assert leader.sweep(m.clock.wall_ns()) == 0
    assert leader.sweep(m.clock.wall_ns() + 11 * S) == 1
    assert set(m.state.jobs) == {kept, dead}  # dead letters stay until purged
    assert m.state.queues["q"].n_done == 0


def test_snapshot_then_restore_gives_the_same_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_module, "CHUNK_BYTES", 3000)  # several chunks
    group = _group(FakeJournal())
    m = _machine(group)
    for i in range(30):
        _enqueue(m, f"q{i % 3}", payload=b"x" * 500, priority=i % 10, unique_key=f"u{i}")
    _enqueue(m, "q0", delay={"seconds": 30})
    remembered = [_enqueue_request(m, f"r{i}" * 40, f"r{i % 3}").job_id for i in range(60)]
    claimed = _claim(m, "q0", "q1", n=5)
    m.decisions.complete(claimed[0].jobs[0].job_id, claimed[0].token, b"r")
    m.decisions.fail(claimed[0].jobs[1].job_id, claimed[0].token, "boom", False, None)
    m.decisions.put_schedule(v.cron_spec(pb.CreateScheduleRequest(
        queue="q2", schedule_id="s", cron="@hourly", template=pb.JobTemplate(type="t")),
        LIMITS, m.clock.wall_ns()), False)
    chunks = m.snapshot()
    assert len(chunks) > 3
    journal = FakeJournal()
    copy = _group(journal, "b", primary=False)
    copy.install(group.log.last_epoch, group.log.last_seq,
                 [(SCHEDULER, slot, data) for slot, data in chunks])
    assert _state(_machine(copy)) == _state(m)
    _untracked(_machine(copy))
    assert journal.cleared == [TABLES]
    assert sum(len(rows) for _, sql, rows in journal.writes
               if "scheduler_requests" in sql) == len(remembered)
    written = sum(len(rows) for _, sql, rows in journal.writes if "scheduler_jobs" in sql)
    assert written == len(m.state.jobs)
    # The copy serves as a primary would: same order of what is ready.
    copy.become_primary(2)
    mine = [j.job_id for c in _claim(m, "q0", "q1", "q2", n=50) for j in c.jobs]
    theirs = [j.job_id for c in _claim(_machine(copy), "q0", "q1", "q2", n=50) for j in c.jobs]
    assert mine == theirs and len(mine) == 25


async def test_a_restarted_node_reads_its_jobs_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "durable.sqlite3")
    journal.create_tables(SCHEMA, TABLES)
    journal.start()
    clock = ManualClock()
    group = _group(journal, clock=clock)
    m = _machine(group)
    forgotten = _enqueue_request(m, "old", "other").job_id
    clock.set(clock.wall_ns() + 10 * S)
    ids = [_enqueue(m, priority=i, unique_key=f"k{i}") for i in range(5)]
    _enqueue(m, delay={"seconds": 60})
    claimed = _claim(m, n=2)
    m.decisions.complete(claimed[0].jobs[0].job_id, claimed[0].token, b"done")
    m.decisions.fail(claimed[0].jobs[1].job_id, claimed[0].token, "x", False, None)
    m.decisions.cancel(ids[0])
    m.decisions.put_schedule(v.cron_spec(pb.CreateScheduleRequest(
        queue="q", schedule_id="s", cron="0 0 * * * *", template=pb.JobTemplate(type="t")),
        LIMITS, m.clock.wall_ns()), False)
    m.decisions.purge("q", [], True)
    asked = _enqueue_request(m, "req", "other").job_id
    assert _leader(m).forget(clock.wall_ns() + int(LIMITS.request_retention * S) - S) == 1
    await asyncio.wait_for(group.wait_committed(group.log.last_seq), 5)
    await journal.close()

    journal = Journal(tmp_path / "durable.sqlite3")  # the node restarts
    journal.create_tables(SCHEMA, TABLES)
    [copy] = journal.copies()
    restored = _group(journal, primary=False, durable=copy, clock=ManualClock(clock.wall_ns()))
    r = _machine(restored)
    assert _state(r) == _state(m)
    _untracked(r)
    restored.become_primary(2)
    assert _enqueue(r, unique_key="k2") == ids[2]  # unique keys came back
    replay = _enqueue_request(r, "req", "other")  # and request ids
    assert (replay.job_id, replay.replayed) == (asked, True)
    assert not _enqueue_request(r, "old", "other").replayed  # forgotten stays forgotten
    assert forgotten
    remaining = [j.job_id for c in _claim(r, n=10) for j in c.jobs]
    assert remaining == [ids[2], ids[1]]
    await journal.close()


def test_a_request_id_makes_one_job_whatever_becomes_of_it() -> None:
    primary, replica = _group(FakeJournal()), _group(FakeJournal(), "b", primary=False)
    m = _machine(primary)
    first = _enqueue_request(m, "r1", payload=b"a")
    assert not first.replayed and first.job is not None
    again = _enqueue_request(m, "r1", payload=b"other", priority=9)  # the rest is ignored
    assert (again.job_id, again.replayed, again.duplicate) == (first.job_id, True, False)
    assert len(m.state.jobs) == 1
    assert _enqueue_request(m, "r1", "q2").job_id != first.job_id  # unique per queue
    # Completed, failed for good, cancelled: a replay still answers the first job.
    ended = {}
    for rid, end in (("done", "complete"), ("dead", "fail"), ("gone", "cancel")):
        job_id = _enqueue_request(m, rid).job_id
        if end == "cancel":
            m.decisions.cancel(job_id)
        else:
            (claimed,) = [c for c in _claim(m, n=10) if job_id in {j.job_id for j in c.jobs}]
            if end == "complete":
                m.decisions.complete(job_id, claimed.token, b"")
            else:
                m.decisions.fail(job_id, claimed.token, "no", False, None)
        ended[rid] = job_id
    for rid, job_id in ended.items():
        replay = _enqueue_request(m, rid)
        assert (replay.job_id, replay.replayed) == (job_id, True)
        assert replay.job is not None and replay.job.finished
    # The job is removed (retention, purge): the id is still answered.
    m.decisions.purge("q", [ended["dead"]], False)
    replay = _enqueue_request(m, "dead")
    assert (replay.job_id, replay.job, replay.replayed) == (ended["dead"], None, True)
    # A held unique key enqueues nothing and remembers nothing.
    holder = _enqueue_request(m, "u1", unique_key="k").job_id
    dup = _enqueue_request(m, "u2", unique_key="k")
    assert (dup.job_id, dup.duplicate, dup.replayed) == (holder, True, False)
    assert "u2" not in m.state.queues["q"].requests
    _replay(primary, replica)
    assert _state(_machine(replica)) == _state(m)
    assert _machine(replica).state.queues["q"].requests["done"][0] == ended["done"]
    _untracked(m)
    _untracked(_machine(replica))


def test_request_ids_are_forgotten_after_their_retention_by_a_command() -> None:
    limits = SchedulerLimits(request_retention=60)
    clock = ManualClock()
    primary = _group(FakeJournal(), limits=limits, clock=clock)
    replica = _group(FakeJournal(), "b", primary=False, limits=limits)
    m = _machine(primary)
    start = m.clock.wall_ns()
    first = _enqueue_request(m, "r").job_id
    assert m.state.queues["q"].requests["r"][1] == start + 60 * S
    leader = _leader(m)
    assert leader.forget(start + 59 * S) == 0
    assert _enqueue_request(m, "r").replayed
    seq = primary.log.last_seq
    assert leader.forget(start + 61 * S) == 1
    assert primary.log.last_seq == seq + 1  # one replicated command
    assert "r" not in m.state.queues["q"].requests
    _replay(primary, replica)
    assert "r" not in _machine(replica).state.queues["q"].requests
    # Past it, the id is new again.
    clock.set(start + 61 * S)
    second = _enqueue_request(m, "r")
    assert not second.replayed and second.job_id != first
    # A stale forget (an older expiry) leaves a newer remembering alone.
    assert not m.state.forget("q", "r", start + 60 * S)
    assert m.state.queues["q"].requests["r"][0] == second.job_id


def test_a_new_primary_forgets_what_the_old_one_remembered() -> None:
    limits = SchedulerLimits(request_retention=60)
    old = _group(FakeJournal(), limits=limits)
    m = _machine(old)
    start = m.clock.wall_ns()
    _enqueue_request(m, "r")
    new = _group(FakeJournal(), "b", primary=False, limits=limits)
    _replay(old, new)
    new.become_primary(2)
    n = _machine(new)
    assert _enqueue_request(n, "r").replayed
    assert _leader(n).forget(start + 61 * S) == 1


@pytest.mark.parametrize("request_id,problem", [("x" * 129, "128 bytes"),
                                                ("a\nb", "control")])
def test_a_bad_request_id_is_refused_naming_the_field(request_id: str, problem: str) -> None:
    with pytest.raises(MeshStatusError) as exc:
        v.job_spec(pb.EnqueueRequest(queue="q", type="t", request_id=request_id), LIMITS, 0)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in exc.value.violations
    assert problem in exc.value.violations["request_id"]


def test_a_complete_or_fail_leases_the_next_jobs_in_the_same_command() -> None:
    primary, replica = _group(FakeJournal()), _group(FakeJournal(), "b", primary=False)
    m = _machine(primary)
    ids = [_enqueue(m, priority=9 - i) for i in range(4)]
    other = _enqueue(m, "r")
    job_id, token = _one(m)
    assert job_id == ids[0]
    then = Next([(m, m.state.queues["q"]), (m, m.state.queues["r"])], "w2", 2, 20 * S, _room())
    seq = primary.log.last_seq
    _, done_seq, claimed = m.decisions.complete(job_id, token, b"ok", then)
    assert done_seq == seq + 1 == primary.log.last_seq  # the end and the lease: one command
    (lease,) = claimed
    assert [j.job_id for j in lease.jobs] == ids[1:3] and lease.seq == done_seq
    assert all(j.state == LEASED and j.worker_id == "w2" and j.lease_token == lease.token
               for j in lease.jobs)
    assert m.state.jobs[job_id].state == SUCCEEDED
    failed = m.decisions.fail(ids[1], lease.token, "no", True, None,
                              Next([(m, m.state.queues["q"])], "w2", 5, 20 * S, _room()))
    assert [j.job_id for c in failed.claimed for j in c.jobs] == [ids[3]]  # not the retry
    assert m.state.jobs[ids[1]].state == WAITING and other in m.state.jobs
    _replay(primary, replica)
    assert _state(_machine(replica)) == _state(m)


def test_a_batch_of_completes_is_one_command_and_answers_each() -> None:
    primary, replica = _group(FakeJournal()), _group(FakeJournal(), "b", primary=False)
    m = _machine(primary)
    ids = [_enqueue(m, priority=9 - i) for i in range(6)]
    (lease,) = _claim(m, n=3)
    first, second, third = (j.job_id for j in lease.jobs)
    token = lease.token
    done, _, _ = m.decisions.complete(third, token, b"before")  # a repeat, below
    q = m.state.queues["q"]
    then = Next([(m, q)], "w", 2, 20 * S, _room())
    other = Next([(m, q)], "w-other", 1, 20 * S, _room())  # another worker: its own command
    seq = primary.log.last_seq
    answers = m.decisions.complete_many([
        (first, token, b"1", then), (second, token + 1, b"x", None),  # a stale token
        (third, token, b"again", None), ("nope", token, b"", None),
        (second, token, b"2", other)])
    ok, stale, repeat, missing, by_other = answers
    assert primary.log.last_seq == seq + 2  # the ends and w's lease; w-other's lease
    assert isinstance(stale, ServiceError) and stale.reason.value == "LEASE_LOST"
    assert isinstance(missing, ServiceError) and missing.reason.value == "JOB_NOT_FOUND"
    assert not isinstance(ok, Exception) and not isinstance(by_other, Exception)
    assert not isinstance(repeat, Exception)
    assert repeat[:2] == (done, m.state.jobs[third].seq)  # answered as the first time
    finish, end_seq, (mine,) = ok
    assert end_seq == seq + 1 == by_other[1] and mine.seq == end_seq
    assert [j.job_id for j in mine.jobs] == ids[3:5] and finish > 0
    assert all(j.state == LEASED and j.worker_id == "w" and j.lease_token == mine.token
               for j in mine.jobs)
    (theirs,) = by_other[2]
    assert [j.job_id for j in theirs.jobs] == [ids[5]] and theirs.seq == seq + 2
    assert theirs.jobs[0].worker_id == "w-other"
    assert all(m.state.jobs[i].state == SUCCEEDED for i in (first, second, third))
    assert m.state.jobs[second].attempts[-1].token == token
    _replay(primary, replica)
    assert _state(_machine(replica)) == _state(m)


def test_an_enqueue_batch_is_one_command_and_answers_each_job() -> None:
    limits = SchedulerLimits(max_queue_jobs=4)
    primary = _group(FakeJournal(), limits=limits)
    replica = _group(FakeJournal(), "b", primary=False, limits=limits)
    m = _machine(primary)
    held = _enqueue(m, unique_key="held")
    known = _enqueue_request(m, "known").job_id
    now = m.clock.wall_ns()

    def item(queue: str = "q", strict: bool = False, request_id: str = "",
             **fields: Any) -> tuple[Any, bool, str]:
        return (v.job_spec(pb.EnqueueRequest(queue=queue, type="t", **fields), limits, now),
                strict, request_id)

    seq = primary.log.last_seq
    answers = m.decisions.enqueue_batch([
        item(payload=b"0"), item("r", request_id="a"), item("r", request_id="a"),
        item(request_id="known"), item(unique_key="held"),
        item(unique_key="held", strict=True), item("r", unique_key="k"),
        item("r", unique_key="k", strict=True), item(), item()], now)
    assert primary.log.last_seq == seq + 1  # one command for the whole share
    first, a, a_again, known_again, dup, strict_dup, k, k_strict, fourth, full = answers
    assert isinstance(first, Enqueued) and isinstance(a, Enqueued) and isinstance(k, Enqueued)
    assert first.job_id.endswith(f"-{seq + 1:x}") and a.job_id.endswith(".1")
    assert isinstance(a_again, Enqueued) and a_again.replayed and a_again.job_id == a.job_id
    assert isinstance(known_again, Enqueued) and (known_again.job_id, known_again.replayed) \
        == (known, True)
    assert isinstance(dup, Enqueued) and dup.duplicate and dup.job_id == held
    assert isinstance(strict_dup, ServiceError) and strict_dup.metadata["job_id"] == held
    assert isinstance(k_strict, ServiceError) and k_strict.metadata["job_id"] == k.job_id
    assert isinstance(fourth, Enqueued) and not fourth.duplicate
    assert isinstance(full, ServiceError) and full.reason.value == "QUEUE_FULL"  # 4 in q now
    assert all(slot_for(j.job_id) == slot_for(j.queue) for j in m.state.jobs.values())
    assert m.state.queues["r"].requests["a"][0] == a.job_id
    _replay(primary, replica)
    assert _state(_machine(replica)) == _state(m)
    order = [j.job_id for c in _claim(m, "q", "r", n=10) for j in c.jobs]
    assert order[:4] == [held, known, first.job_id, a.job_id]  # FIFO within the command too


def test_a_job_keeps_its_latest_attempts_only() -> None:
    state = SchedulerState()
    job = Job("{q}1-1", "q", "t", b"", 0, 1000, shared_backoff(S, S, 1.0, 0.0), S, S, 0, 0)
    state.add(job, 0)
    for n in range(1, MAX_HISTORY + 6):
        state.lease(job, n, "w", n, S, n)
        state.end(job, spb.EndAttempt(job_id=job.job_id, lease_token=n, run_ns=n,
                                      outcome=pb.ATTEMPT_OUTCOME_FAILED), n, n, n)
    assert job.state == WAITING and job.attempt_count == MAX_HISTORY + 5
    assert [a.number for a in job.attempts] == list(range(6, MAX_HISTORY + 6))
    assert all(a.outcome == pb.ATTEMPT_OUTCOME_FAILED for a in job.attempts)


def test_a_claim_takes_only_the_jobs_that_fit_in_one_answer() -> None:
    m = _machine(_group(FakeJournal()))
    ids = [_enqueue(m, payload=b"p" * 10_000) for _ in range(3)]
    # 10 kB payloads (and their names) in 25 kB of room: two fit, the third waits.
    (lease,) = _claim(m, n=3, room=25_000)
    assert [j.job_id for j in lease.jobs] == ids[:2]
    assert m.state.jobs[ids[2]].state == WAITING
    # A strict room (a forwarded share's) takes nothing past it, not even a first job.
    assert claim([(m, m.state.queues["q"])], "w", 3, 30 * S, m.clock.wall_ns(),
                 Room(100, strict=True)) == []
    assert m.state.jobs[ids[2]].state == WAITING
    # A job larger than the whole room still goes: a claim never stays empty for it.
    (lease,) = _claim(m, n=3, room=100)
    assert [j.job_id for j in lease.jobs] == ids[2:]


def test_a_batch_of_completes_shares_one_answers_room_for_the_next_jobs() -> None:
    m = _machine(_group(FakeJournal()))
    ids = [_enqueue(m, payload=b"p" * 10_000, priority=9 - i) for i in range(6)]
    (lease,) = _claim(m, n=2)
    q = m.state.queues["q"]
    room = _room(25_000)
    answers = m.decisions.complete_many([
        (job.job_id, lease.token, b"", Next([(m, q)], "w", 2, 20 * S, room))
        for job in lease.jobs])
    claimed = [j.job_id for answer in answers if not isinstance(answer, Exception)
               for c in answer[2] for j in c.jobs]
    assert claimed == ids[2:4]  # two fit the one answer, not two for each Complete
    assert all(m.state.jobs[i].state == WAITING for i in ids[4:])


async def test_stats_reads_then_waits_so_a_job_enqueued_meanwhile_is_not_counted() -> None:
    """Stats answers once what it read is committed; a job decided while it
    waits (not committed when it answers) is not in it, and the answer stands
    if the group leaves this node as its wait ends."""
    clock = ManualClock()
    journal = FakeJournal()
    service = SchedulerService(LIMITS, journal, clock)  # type: ignore[arg-type]
    group = Group(5, "a", {SCHEDULER: service.machine}, clock=clock, journal=journal)
    group.become_primary(1)
    tracker = replica_of(group)
    service.start_routing(Here(group))  # type: ignore[arg-type]
    _enqueue(_machine(group))  # proposed, not yet committed
    context: Any = None
    stats = asyncio.ensure_future(service.Stats(pb.StatsRequest(queue="q"), context))
    await asyncio.sleep(0)
    assert not stats.done()  # waits for the first job to commit
    read_at = group.log.last_seq
    _enqueue(_machine(group))  # decided during the wait
    acked(tracker, read_at)
    answer = await asyncio.wait_for(stats, 1)
    assert answer.ready == 1
    # The same read as the group leaves this node at the end of its wait: what
    # it read is committed, and nothing is read after the await.
    stats = asyncio.ensure_future(service.Stats(pb.StatsRequest(queue="q"), context))
    await asyncio.sleep(0)
    acked(tracker)
    group.close("the map moved the group to another node")
    assert (await asyncio.wait_for(stats, 1)).ready == 2
