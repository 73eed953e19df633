"""SchedulerService over the wire, against a real three-node mesh (R = 1), with the
raw generated stub: what any gRPC language sees (ordering, leases and tokens,
retries and dead letters, unique keys, cron, codes, reasons, named fields,
forwarding, long polls). Failover under load is in test_scheduler_acceptance.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from common.localmesh import LocalMesh
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from tests.cluster import error_details
from tests.conftest import non_owner

Stub = pb_grpc.SchedulerServiceStub
S = 1_000_000_000


def _d(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


@pytest.fixture
def stub_at(channel_at: Callable[[str], grpc.aio.Channel]) -> Callable[[str], Stub]:
    return lambda address: Stub(channel_at(address))


@pytest.fixture
def stub(shared_cluster: LocalMesh, stub_at: Any) -> Stub:
    """Any node: most queues are led elsewhere and forwarded."""
    return stub_at(shared_cluster.nodes[0].address)  # type: ignore[no-any-return]


async def _enqueue(stub: Stub, queue: str, **fields: Any) -> pb.EnqueueResponse:
    fields.setdefault("type", "test.job")
    return await stub.Enqueue(pb.EnqueueRequest(queue=queue, **fields))  # type: ignore[no-any-return]


async def _claim(stub: Stub, *queues: str, max_jobs: int = 1, lease: float = 30,
                 wait: float = 0, worker: str = "w1") -> list[pb.ClaimedJob]:
    reply = await stub.Claim(pb.ClaimRequest(
        queues=list(queues), worker_id=worker, max_jobs=max_jobs, lease_duration=_d(lease),
        wait=_d(wait)))
    return list(reply.jobs)


async def test_claim_order_priority_then_fifo_and_delays_only_when_due(stub: Stub) -> None:
    q = "rpc-order"
    ids = {}
    for name, priority in [("low", 1), ("mid-a", 5), ("mid-b", 5), ("zero", 0), ("top", 9)]:
        ids[name] = (await _enqueue(stub, q, priority=priority, payload=name.encode())).job_id
    # Due in 2 s: the calls until the "not due yet" claim must not outlast it, even
    # slowed down on a loaded machine.
    later = await _enqueue(stub, q, priority=9, payload=b"later", delay=_d(2))
    assert later.state == pb.JOB_STATE_SCHEDULED
    assert (await _enqueue(stub, q, payload=b"x")).state == pb.JOB_STATE_PENDING
    stats = await stub.Stats(pb.StatsRequest(queue=q))
    assert (stats.ready, stats.delayed, stats.leased) == (6, 1, 0)
    assert stats.oldest_ready_time.seconds > 0
    jobs = await _claim(stub, q, max_jobs=10)
    assert [j.payload for j in jobs] == [b"top", b"mid-a", b"mid-b", b"low", b"zero", b"x"]
    assert [j.priority for j in jobs] == [9, 5, 5, 1, 0, 0]
    assert jobs[0].job_id == ids["top"] and jobs[0].attempt == 1 and jobs[0].max_attempts == 3
    assert len({j.lease_token for j in jobs}) == 1 and jobs[0].lease_token > 0  # one lease cmd
    assert await _claim(stub, q) == []  # the delayed one is not due yet
    due = await _claim(stub, q, wait=10)  # a long poll: answered once it is due
    assert [j.payload for j in due] == [b"later"] and due[0].lease_token > jobs[0].lease_token
    # Never leased early, by the node's own stamps (leased at expiry less the lease).
    leased_at = due[0].lease_expire_time.ToNanoseconds() - 30 * S
    assert leased_at >= later.run_time.ToNanoseconds(), (leased_at, later.run_time)
    stats = await stub.Stats(pb.StatsRequest(queue=q))
    assert (stats.ready, stats.delayed, stats.leased) == (0, 0, 7)


async def test_stale_tokens_are_refused_with_lease_lost(stub: Stub) -> None:
    q = "rpc-tokens"
    job_id = (await _enqueue(stub, q)).job_id
    # Leases long enough that none runs out on a loaded machine before the calls below.
    (job,) = await _claim(stub, q, lease=5)
    assert job.job_id == job_id
    beat = await stub.Heartbeat(pb.HeartbeatRequest(job_id=job_id, lease_token=job.lease_token,
                                                    extend=_d(10)))
    assert beat.lease_expire_time.ToNanoseconds() > job.lease_expire_time.ToNanoseconds()
    for call in (stub.Heartbeat(pb.HeartbeatRequest(job_id=job_id,
                                                    lease_token=job.lease_token + 1)),
                 stub.Complete(pb.CompleteRequest(job_id=job_id, lease_token=7)),
                 stub.Fail(pb.FailRequest(job_id=job_id, lease_token=7, retryable=True))):
        error = await _error(call)
        reason, metadata, _ = error_details(error)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and reason == "LEASE_LOST"
        assert metadata["state"] == "JOB_STATE_LEASED"
    done = await stub.Complete(pb.CompleteRequest(job_id=job_id, lease_token=job.lease_token,
                                                  result=b"42"))
    again = await stub.Complete(pb.CompleteRequest(job_id=job_id, lease_token=job.lease_token,
                                                   result=b"42"))
    assert again.finish_time == done.finish_time  # a retried Complete: the same answer
    error = await _error(stub.Heartbeat(pb.HeartbeatRequest(job_id=job_id,
                                                            lease_token=job.lease_token)))
    assert error_details(error)[1]["state"] == "JOB_STATE_SUCCEEDED"
    got = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert got.state == pb.JOB_STATE_SUCCEEDED and got.result == b"42"
    error = await _error(stub.GetJob(pb.GetJobRequest(job_id=job_id + "x")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(error)[0] == "JOB_NOT_FOUND"


async def test_an_expired_lease_puts_the_job_back_without_spending_an_attempt(
        stub: Stub) -> None:
    q = "rpc-expiry"
    job_id = (await _enqueue(stub, q, max_attempts=1)).job_id
    (first,) = await _claim(stub, q, lease=1, worker="doomed")
    (second,) = await _claim(stub, q, lease=5, wait=3, worker="next")
    assert time.time_ns() >= first.lease_expire_time.ToNanoseconds()  # not taken early
    assert second.job_id == job_id and second.lease_token > first.lease_token
    assert second.attempt == 1 and second.lease_losses == 1
    error = await _error(stub.Complete(pb.CompleteRequest(job_id=job_id,
                                                          lease_token=first.lease_token)))
    assert error_details(error)[0] == "LEASE_LOST"
    await stub.Complete(pb.CompleteRequest(job_id=job_id, lease_token=second.lease_token))
    job = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.lease_losses == 1
    assert job.attempt_count == 1
    assert [(a.number, a.worker_id, a.outcome) for a in job.attempts] == [
        (1, "doomed", pb.ATTEMPT_OUTCOME_LEASE_EXPIRED),
        (1, "next", pb.ATTEMPT_OUTCOME_SUCCEEDED)]
    assert "expired" in job.attempts[0].error
    stats = await stub.Stats(pb.StatsRequest(queue=q))
    assert (stats.lease_losses_total, stats.failed_attempts_total, stats.done) == (1, 0, 1)


async def test_retries_back_off_then_die_and_dead_letters_requeue_and_purge(
        stub: Stub) -> None:
    q = "rpc-retry"
    backoff = pb.Backoff(initial_delay=_d(0.2), multiplier=2, max_delay=_d(10))
    job_id = (await _enqueue(stub, q, max_attempts=3, backoff=backoff)).job_id
    (job,) = await _claim(stub, q)
    for attempt, delay in ((1, 0.2), (2, 0.4)):
        assert job.attempt == attempt
        # The node stamps the failure between these two readings of the same clock,
        # so the retry is due exactly `delay` after some moment within them. Bounds
        # from the node's own stamp, not from how fast the calls ran, cannot flake.
        before = time.time_ns()
        failed = await stub.Fail(pb.FailRequest(job_id=job_id, lease_token=job.lease_token,
                                                error=f"boom {attempt}", retryable=True))
        after = time.time_ns()
        assert failed.state == pb.JOB_STATE_SCHEDULED and failed.attempts == attempt
        due = failed.next_run_time.ToNanoseconds()
        assert before + delay * S <= due <= after + delay * S, (before, due, after)
        (job,) = await _claim(stub, q, wait=5)
        assert time.time_ns() >= due  # never handed out before its backoff ran out
    assert job.attempt == 3
    failed = await stub.Fail(pb.FailRequest(job_id=job_id, lease_token=job.lease_token,
                                            error="last straw", retryable=True))
    assert failed.state == pb.JOB_STATE_DEAD and not failed.HasField("next_run_time")
    stats = await stub.Stats(pb.StatsRequest(queue=q))
    assert (stats.dead, stats.failed_attempts_total) == (1, 3)
    second = (await _enqueue(stub, q)).job_id
    (job,) = await _claim(stub, q)
    no_retry = await stub.Fail(pb.FailRequest(job_id=second, lease_token=job.lease_token,
                                              error="fatal", retryable=False))
    assert no_retry.state == pb.JOB_STATE_DEAD

    page = await stub.ListDeadLetters(pb.ListDeadLettersRequest(queue=q, page_size=1))
    assert [j.job_id for j in page.jobs] == [job_id] and page.total == 2
    assert page.jobs[0].last_error == "last straw" and page.next_page_token
    rest = await stub.ListDeadLetters(pb.ListDeadLettersRequest(
        queue=q, page_token=page.next_page_token))
    assert [j.job_id for j in rest.jobs] == [second] and not rest.next_page_token

    requeued = await stub.RequeueDeadLetters(pb.RequeueDeadLettersRequest(
        queue=q, job_ids=[job_id, "{nope}1-1"]))
    assert (requeued.requeued, requeued.remaining) == (1, 1)
    (job,) = await _claim(stub, q)
    assert job.job_id == job_id and job.attempt == 1  # a fresh budget
    assert len((await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job.attempts) == 4
    nothing = await stub.PurgeDeadLetters(pb.PurgeDeadLettersRequest(queue=q))
    assert (nothing.purged, nothing.remaining) == (0, 1)  # no ids, no all: nothing
    purged = await stub.PurgeDeadLetters(pb.PurgeDeadLettersRequest(queue=q, all=True))
    assert (purged.purged, purged.remaining) == (1, 0)
    error = await _error(stub.GetJob(pb.GetJobRequest(job_id=second)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel(stub: Stub) -> None:
    q = "rpc-cancel"
    waiting = (await _enqueue(stub, q, delay=_d(60))).job_id
    cancelled = await stub.Cancel(pb.CancelRequest(job_id=waiting))
    assert cancelled.cancelled and cancelled.state == pb.JOB_STATE_CANCELLED
    again = await stub.Cancel(pb.CancelRequest(job_id=waiting))
    assert not again.cancelled and again.state == pb.JOB_STATE_CANCELLED
    running = (await _enqueue(stub, q)).job_id
    (job,) = await _claim(stub, q)
    assert (await stub.Cancel(pb.CancelRequest(job_id=running))).cancelled
    error = await _error(stub.Complete(pb.CompleteRequest(job_id=running,
                                                          lease_token=job.lease_token)))
    assert error_details(error)[1]["state"] == "JOB_STATE_CANCELLED"
    got = (await stub.GetJob(pb.GetJobRequest(job_id=running))).job
    assert got.attempts[-1].outcome == pb.ATTEMPT_OUTCOME_CANCELLED
    stats = await stub.Stats(pb.StatsRequest(queue=q))
    assert (stats.cancelled, stats.ready, stats.delayed, stats.leased) == (2, 0, 0, 0)


async def test_get_job_shows_its_history(stub: Stub) -> None:
    q = "rpc-history"
    job_id = (await _enqueue(stub, q, payload=b"p", priority=3, unique_key="h")).job_id
    (job,) = await _claim(stub, q, worker="alice")
    await stub.Fail(pb.FailRequest(job_id=job_id, lease_token=job.lease_token, error="flaky",
                                   retryable=True, retry_delay=_d(0)))
    (job,) = await _claim(stub, q, worker="bob")
    await stub.Complete(pb.CompleteRequest(job_id=job_id, lease_token=job.lease_token,
                                           result=b"r"))
    got = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert (got.queue, got.type, got.payload, got.priority, got.unique_key) == (
        q, "test.job", b"p", 3, "h")
    assert (got.state, got.attempt_count, got.max_attempts, got.result) == (
        pb.JOB_STATE_SUCCEEDED, 2, 3, b"r")
    assert got.backoff.initial_delay.seconds == 1 and got.backoff.multiplier == 2
    assert got.timeout.seconds == 1800 and got.retention.seconds == 86400
    first, second = got.attempts
    assert (first.number, first.worker_id, first.outcome, first.error) == (
        1, "alice", pb.ATTEMPT_OUTCOME_FAILED, "flaky")
    assert (second.number, second.worker_id, second.outcome) == (
        2, "bob", pb.ATTEMPT_OUTCOME_SUCCEEDED)
    assert first.start_time.ToNanoseconds() <= first.finish_time.ToNanoseconds() \
        <= second.start_time.ToNanoseconds() <= second.finish_time.ToNanoseconds()
    assert got.finish_time == second.finish_time and got.last_error == "flaky"


async def test_unique_keys(stub: Stub) -> None:
    q = "rpc-unique"
    first = await _enqueue(stub, q, unique_key="report:7")
    again = await _enqueue(stub, q, unique_key="report:7", payload=b"other")
    assert again.duplicate and again.job_id == first.job_id and not first.duplicate
    error = await _error(_enqueue(stub, q, unique_key="report:7", strict_unique=True))
    reason, metadata, _ = error_details(error)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and reason == "DUPLICATE_JOB"
    assert metadata["job_id"] == first.job_id
    assert not (await _enqueue(stub, "rpc-unique-other", unique_key="report:7")).duplicate
    (job,) = await _claim(stub, q)
    assert (await _enqueue(stub, q, unique_key="report:7")).duplicate  # leased: still held
    await stub.Complete(pb.CompleteRequest(job_id=job.job_id, lease_token=job.lease_token))
    after = await _enqueue(stub, q, unique_key="report:7", strict_unique=True)
    assert not after.duplicate and after.job_id != first.job_id  # finished: released
    # The key is held unique_ttl from the node's enqueue stamp (the job's run_time):
    # 1.5 s leaves room for a slow second call on a loaded machine.
    short = await _enqueue(stub, q, unique_key="ttl", unique_ttl=_d(1.5))
    assert (await _enqueue(stub, q, unique_key="ttl")).job_id == short.job_id
    released = short.run_time.ToNanoseconds() + int(1.5 * S)
    await asyncio.sleep(max(0, released - time.time_ns()) / S + 0.05)
    assert not (await _enqueue(stub, q, unique_key="ttl")).duplicate  # the ttl passed


async def test_cron_schedules(stub: Stub) -> None:
    q = "rpc-cron"
    template = pb.JobTemplate(type="tick", payload=b"t", priority=2)
    created = await stub.CreateSchedule(pb.CreateScheduleRequest(
        queue=q, schedule_id="every-second", cron="* * * * * *", template=template))
    schedule = created.schedule
    assert schedule.next_fire_time.ToNanoseconds() <= time.time_ns() + 1_100_000_000
    assert schedule.template.max_attempts == 3 and schedule.template.priority == 2
    error = await _error(stub.CreateSchedule(pb.CreateScheduleRequest(
        queue=q, schedule_id="every-second", cron="* * * * *", template=template)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(error)[0] == "SCHEDULE_EXISTS"
    await stub.CreateSchedule(pb.CreateScheduleRequest(
        queue=q, schedule_id="nightly", cron="0 3 * * *", timezone="Europe/Paris",
        template=template))
    listed = await stub.ListSchedules(pb.ListSchedulesRequest(queue=q, page_size=1))
    assert [s.schedule_id for s in listed.schedules] == ["every-second"]
    rest = await stub.ListSchedules(pb.ListSchedulesRequest(
        queue=q, page_token=listed.next_page_token))
    assert [s.schedule_id for s in rest.schedules] == ["nightly"] and not rest.next_page_token
    # Claimed until two ticks fired, however late a loaded machine makes that; how
    # many fired is checked against the node's own stamps, not against a sleep.
    jobs: list[pb.ClaimedJob] = []
    async with asyncio.timeout(15):
        while len(jobs) < 2:
            jobs += await _claim(stub, q, max_jobs=10, wait=1)
    claimed_by = time.time_ns()
    assert {j.type for j in jobs} == {"tick"}
    got = [(await stub.GetJob(pb.GetJobRequest(job_id=j.job_id))).job for j in jobs]
    runs = sorted(j.run_time.ToNanoseconds() for j in got)
    assert all(r % 1_000_000_000 == 0 for r in runs)  # each job runs at its tick
    first_tick = schedule.next_fire_time.ToNanoseconds()
    # One job per tick, none skipped, from the first tick on, none before its time.
    assert runs == [first_tick + i * S for i in range(len(runs))], runs
    assert runs[-1] <= claimed_by
    assert {j.schedule_id for j in got} == {"every-second"}
    (current,) = [s for s in (await stub.ListSchedules(pb.ListSchedulesRequest(
        queue=q))).schedules if s.schedule_id == "every-second"]
    assert current.fired_total >= len(jobs) and current.last_job_id
    assert (await stub.Stats(pb.StatsRequest(queue=q))).schedules == 2
    deleted = await stub.DeleteSchedule(pb.DeleteScheduleRequest(queue=q,
                                                                 schedule_id="every-second"))
    deleted_by = time.time_ns()
    assert deleted.deleted
    assert not (await stub.DeleteSchedule(pb.DeleteScheduleRequest(
        queue=q, schedule_id="every-second"))).deleted
    await asyncio.sleep(1.2)  # a tick would be due meanwhile, had the delete not held
    late = await _claim(stub, q, max_jobs=10)
    # Only ticks that fired before the delete (however many a slow run let through
    # since the claim above), none after it.
    late_runs = [(await stub.GetJob(pb.GetJobRequest(job_id=j.job_id))).job
                 .run_time.ToNanoseconds() for j in late]
    assert all(runs[-1] < r <= deleted_by for r in late_runs), (late_runs, deleted_by)


@pytest.mark.parametrize(("request_", "field"), [
    (pb.EnqueueRequest(queue="", type="t"), "queue"),
    (pb.EnqueueRequest(queue="bad queue", type="t"), "queue"),
    (pb.EnqueueRequest(queue="q\n", type="t"), "queue"),
    (pb.EnqueueRequest(queue="q" * 257, type="t"), "queue"),
    (pb.EnqueueRequest(queue="q", type=""), "type"),
    (pb.EnqueueRequest(queue="q", type="t", priority=10), "priority"),
    (pb.EnqueueRequest(queue="q", type="t", delay=duration_pb2.Duration(seconds=-1)),
     "delay"),
    (pb.EnqueueRequest(queue="q", type="t", payload=b"x" * ((1 << 20) + 1)), "payload"),
    (pb.EnqueueRequest(queue="q", type="t", max_attempts=1001), "max_attempts"),
    (pb.EnqueueRequest(queue="q", type="t", request_id="r" * 129), "request_id"),
    (pb.EnqueueRequest(queue="q", type="t", backoff=pb.Backoff(jitter=1.5)), "backoff.jitter"),
    (pb.EnqueueRequest(queue="q", type="t", backoff=pb.Backoff(multiplier=0.5)),
     "backoff.multiplier"),
    (pb.EnqueueRequest(queue="q", type="t", timeout=duration_pb2.Duration(seconds=-5)),
     "timeout"),
    (pb.ClaimRequest(queues=[], worker_id="w"), "queues"),
    (pb.ClaimRequest(queues=["a", "a"], worker_id="w"), "queues"),
    (pb.ClaimRequest(queues=["a b"], worker_id="w"), "queues[0]"),
    (pb.ClaimRequest(queues=["a"], worker_id=""), "worker_id"),
    (pb.ClaimRequest(queues=["a"], worker_id="w", max_jobs=101), "max_jobs"),
    (pb.ClaimRequest(queues=["a"], worker_id="w", lease_duration=_d(0.1)), "lease_duration"),
    (pb.ClaimRequest(queues=["a"], worker_id="w", wait=_d(61)), "wait"),
    (pb.HeartbeatRequest(job_id=""), "job_id"),
    (pb.CompleteRequest(job_id="{a}1-1", result=b"x" * ((1 << 20) + 1)), "result"),
    (pb.PurgeDeadLettersRequest(queue="q", job_ids=["x"], all=True), "job_ids"),
    (pb.CreateScheduleRequest(queue="q", schedule_id="s", cron="* * *",
                              template=pb.JobTemplate(type="t")), "cron"),
    (pb.CreateScheduleRequest(queue="q", schedule_id="s", cron="61 * * * *",
                              template=pb.JobTemplate(type="t")), "cron"),
    (pb.CreateScheduleRequest(queue="q", schedule_id="s", cron="0 0 30 2 *",
                              template=pb.JobTemplate(type="t")), "cron"),
    (pb.CreateScheduleRequest(queue="q", schedule_id="s", cron="@daily", timezone="Mars/Base",
                              template=pb.JobTemplate(type="t")), "timezone"),
    (pb.CreateScheduleRequest(queue="q", schedule_id="s", cron="@daily",
                              template=pb.JobTemplate(type="t", priority=12)),
     "template.priority"),
    (pb.CreateScheduleRequest(queue="q", schedule_id="", cron="@daily",
                              template=pb.JobTemplate(type="t")), "schedule_id"),
])
async def test_bad_input_names_the_field(stub: Stub, request_: Any, field: str) -> None:
    method = {pb.EnqueueRequest: stub.Enqueue, pb.ClaimRequest: stub.Claim,
              pb.HeartbeatRequest: stub.Heartbeat, pb.CompleteRequest: stub.Complete,
              pb.PurgeDeadLettersRequest: stub.PurgeDeadLetters,
              pb.CreateScheduleRequest: stub.CreateSchedule}[type(request_)]
    error = await _error(method(request_))
    reason, _, violations = error_details(error)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_ARGUMENT"
    assert list(violations) == [field], violations


async def test_a_non_owner_forwards_every_call(shared_cluster: LocalMesh, stub_at: Any
                                               ) -> None:
    q = "rpc-forward"
    for address in non_owner(shared_cluster, q):
        s = stub_at(address)
        job_id = (await _enqueue(s, q)).job_id
        (job,) = await _claim(s, q)
        assert job.job_id == job_id
        await s.Heartbeat(pb.HeartbeatRequest(job_id=job_id, lease_token=job.lease_token))
        await s.Complete(pb.CompleteRequest(job_id=job_id, lease_token=job.lease_token))
        assert (await s.GetJob(pb.GetJobRequest(job_id=job_id))).job.state \
            == pb.JOB_STATE_SUCCEEDED
        assert (await s.Stats(pb.StatsRequest(queue=q))).done >= 1
    # A client that routes by itself is told where to go instead.
    error = await _error(stub_at(non_owner(shared_cluster, q)[0]).Stats(
        pb.StatsRequest(queue=q), metadata=(("x-mesh-route", "client"),)))
    assert error_details(error)[0] == "WRONG_OWNER"


async def test_a_long_poll_claim_wakes_on_enqueue(stub: Stub) -> None:
    a, b = "{rpc-poll}a", "{rpc-poll}b"  # one slot, so one owner
    started = time.monotonic()
    claim = asyncio.create_task(_claim(stub, a, b, wait=10, max_jobs=5))
    await asyncio.sleep(0.3)
    assert not claim.done()
    job_id = (await _enqueue(stub, b)).job_id
    # Woken by the enqueue, well before its 10 s wait ran out (generous for a loaded
    # machine: a wait that ran out would answer with no job at 10 s).
    jobs = await asyncio.wait_for(claim, 8)
    assert [j.job_id for j in jobs] == [job_id] and time.monotonic() - started < 8
    started = time.monotonic()
    assert await _claim(stub, a, wait=0.4) == []  # an empty answer when time is up
    assert 0.3 < time.monotonic() - started < 5  # not early; slow only under load


async def test_a_claim_over_queues_of_several_owners_is_refused(shared_cluster: LocalMesh,
                                                                stub: Stub) -> None:
    queues = [f"rpc-owners-{i}" for i in range(12)]
    error = await _error(_claim(stub, *queues))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(error)[0] == "WRONG_OWNER"
