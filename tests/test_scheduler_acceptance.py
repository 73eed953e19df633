"""The scheduler's acceptance scenarios, with real processes throughout.

Real etcd, a coordinator and three nodes (R = 1, 2 s leases). Calls go through
the raw generated stub to any live node (a node that does not lead the queue
forwards), as a worker in any language would; the dying worker is a process of
its own (tests/job_claimer.py).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2

from common.clustermap import read_map, wait_for_map
from common.slots import slot_for
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from tests.cluster import LiveNodes, error_details, workers

LEASE_TTL = 2
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
T = TypeVar("T")


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


class Nodes(LiveNodes):
    """Raw SchedulerService stubs to the mesh's live nodes."""

    def stub(self) -> pb_grpc.SchedulerServiceStub:
        return pb_grpc.SchedulerServiceStub(self.channel())

    async def retry(self, call: Callable[[pb_grpc.SchedulerServiceStub], Awaitable[T]],
                    limit: float = 30.0) -> T:
        """``call`` on some live node, again on UNAVAILABLE (safe calls only)."""
        async with asyncio.timeout(limit):
            while True:
                try:
                    return await call(self.stub())
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE:
                        raise
                await asyncio.sleep(0.05)

    async def enqueue(self, queue: str, payload: bytes = b"", **fields: Any
                      ) -> pb.EnqueueResponse:
        # A unique key makes the retry of an append whose answer was lost safe.
        request = pb.EnqueueRequest(queue=queue, type="t", payload=payload,
                                    unique_key=str(uuid.uuid4()), unique_ttl=seconds(300),
                                    **fields)
        return await self.retry(lambda s: s.Enqueue(request, timeout=3))

    async def claim(self, queue: str, max_jobs: int = 1, wait: float = 5.0,
                    lease: float = 30.0) -> list[pb.ClaimedJob]:
        request = pb.ClaimRequest(queues=[queue], worker_id="test", max_jobs=max_jobs,
                                  lease_duration=seconds(lease), wait=seconds(wait))
        reply = await self.retry(lambda s: s.Claim(request, timeout=wait + 3))
        return list(reply.jobs)

    async def job(self, job_id: str) -> pb.Job:
        reply = await self.retry(lambda s: s.GetJob(pb.GetJobRequest(job_id=job_id), timeout=3))
        job: pb.Job = reply.job
        return job


@pytest.fixture
async def mesh3(local_mesh: Any) -> Any:
    local = local_mesh(3, lease_ttl=LEASE_TTL)
    nodes = Nodes(local)
    try:
        yield local, nodes
    finally:
        await nodes.close()


def at(ts: Any) -> float:
    return float(ts.ToNanoseconds()) / 1e9


async def test_claims_follow_priority_then_fifo_and_never_run_early(mesh3: Any) -> None:
    _, nodes = mesh3
    queue = "acc-order"
    order = [(b"a", 1), (b"b", 5), (b"c", 5), (b"d", 9), (b"e", 1)]
    for payload, priority in order:
        await nodes.enqueue(queue, payload, priority=priority)
    for payload in (b"late-1", b"late-2"):
        await nodes.enqueue(queue, payload, priority=9, delay=seconds(1.0))

    now = await nodes.claim(queue, max_jobs=10, wait=0)
    assert [j.payload for j in now] == [b"d", b"b", b"c", b"a", b"e"]
    later: list[pb.ClaimedJob] = []
    while len(later) < 2:
        later += await nodes.claim(queue, max_jobs=10, wait=5)
    assert [j.payload for j in later] == [b"late-1", b"late-2"]
    for claimed in now + later:
        job = await nodes.job(claimed.job_id)
        assert at(job.attempts[0].start_time) >= at(job.run_time), job


async def test_failures_retry_with_backoff_then_succeed_or_go_dead(mesh3: Any) -> None:
    _, nodes = mesh3
    queue = "acc-retry"
    backoff = pb.Backoff(initial_delay=seconds(0.4), multiplier=2, max_delay=seconds(5))
    job_id = (await nodes.enqueue(queue, max_attempts=5, backoff=backoff)).job_id
    for attempt in (1, 2, 3):
        [claimed] = await nodes.claim(queue)
        assert claimed.job_id == job_id and claimed.attempt == attempt
        stub = nodes.stub()
        if attempt < 3:
            await stub.Fail(pb.FailRequest(job_id=job_id, lease_token=claimed.lease_token,
                                           error=f"boom {attempt}", retryable=True))
        else:
            await stub.Complete(pb.CompleteRequest(job_id=job_id,
                                                   lease_token=claimed.lease_token))
    job = await nodes.job(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempt_count == 3
    attempts = list(job.attempts)
    assert [a.error for a in attempts[:2]] == ["boom 1", "boom 2"]
    gaps = [at(b.start_time) - at(a.finish_time) for a, b in itertools.pairwise(attempts)]
    print(f"\nbackoff gaps {[round(g, 3) for g in gaps]} s, configured [0.4, 0.8] s")
    for gap, wanted in zip(gaps, (0.4, 0.8), strict=True):
        # Never early, by the node's own stamps; the upper bound only tells 0.4 from
        # 0.8 and leaves room for a loaded machine.
        assert wanted <= gap < wanted * 1.9, gaps

    doomed = (await nodes.enqueue(queue, max_attempts=3, backoff=pb.Backoff(
        initial_delay=seconds(0.05), multiplier=1))).job_id
    states = []
    for _ in range(3):
        [claimed] = await nodes.claim(queue)
        reply = await nodes.stub().Fail(pb.FailRequest(
            job_id=doomed, lease_token=claimed.lease_token, error="always", retryable=True))
        states.append(reply.state)
    assert states[-1] == pb.JOB_STATE_DEAD and pb.JOB_STATE_DEAD not in states[:-1]
    dead = await nodes.stub().ListDeadLetters(pb.ListDeadLettersRequest(queue=queue))
    assert [j.job_id for j in dead.jobs] == [doomed]
    requeued = await nodes.stub().RequeueDeadLetters(
        pb.RequeueDeadLettersRequest(queue=queue, job_ids=[doomed]))
    assert requeued.requeued == 1
    [again] = await nodes.claim(queue)
    assert again.job_id == doomed and again.attempt == 1


async def test_a_killed_workers_job_comes_back_and_its_late_complete_is_refused(
    mesh3: Any, tmp_path: Path
) -> None:
    local, nodes = mesh3
    queue = "acc-killed"
    job_id = (await nodes.enqueue(queue)).job_id
    async with workers(local, tmp_path, "tests.job_claimer") as start:
        worker = await start(local.nodes[0].address, queue, "1.5")
        _, claimed_id, token = (await worker.line("CLAIMED")).split()
        assert claimed_id == job_id
        worker.signal(signal.SIGKILL)
        killed = time.monotonic()
        [again] = await nodes.claim(queue, wait=10)
    assert again.job_id == job_id and again.lease_token > int(token)
    print(f"\nclaimed again {time.monotonic() - killed:.2f} s after the worker died "
          f"(lease 1.5 s)")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await nodes.stub().Complete(pb.CompleteRequest(job_id=job_id, lease_token=int(token)))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(refused.value)[0] == "LEASE_LOST"
    await nodes.stub().Complete(pb.CompleteRequest(job_id=job_id,
                                                   lease_token=again.lease_token))
    job = await nodes.job(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.lease_losses == 1
    assert pb.ATTEMPT_OUTCOME_LEASE_EXPIRED in [a.outcome for a in job.attempts]


async def test_sigkill_a_primary_under_load_loses_no_acknowledged_job(mesh3: Any) -> None:
    local, nodes = mesh3
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    victim = local.nodes[0]
    queues = [f"acc-load-{i}" for i in range(12)]
    assert any((g := table.group_of_slot(slot_for(q))) is not None
               and g.primary == victim.node_id for q in queues)
    acked: set[str] = set()
    processed: collections.Counter[str] = collections.Counter()
    stop_enqueue, stop_work, acked_more = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def enqueuer() -> None:
        while not stop_enqueue.is_set():
            acked.add((await nodes.enqueue(random.choice(queues))).job_id)
            acked_more.set()

    async def complete(job: pb.ClaimedJob) -> None:
        request = pb.CompleteRequest(job_id=job.job_id, lease_token=job.lease_token)
        try:  # the same token again is safe: a repeated Complete answers the same
            await nodes.retry(lambda s: s.Complete(request, timeout=3))
        except grpc.aio.AioRpcError as error:
            if error_details(error)[0] != "LEASE_LOST":  # then it is someone else's
                raise

    async def worker(queue: str) -> None:
        while not stop_work.is_set():
            for job in await nodes.claim(queue, max_jobs=10, wait=0.5, lease=3.0):
                processed[job.job_id] += 1
                await complete(job)

    async def acked_at_least(count: int) -> None:
        # Counted, not timed: a loaded machine enqueues slower, not fewer.
        async with asyncio.timeout(30):
            while len(acked) < count:
                acked_more.clear()
                await acked_more.wait()

    enqueuers = [asyncio.create_task(enqueuer()) for _ in range(4)]
    working = [asyncio.create_task(worker(q)) for q in queues]
    try:
        await asyncio.sleep(1.0)
        await acked_at_least(60)
        victim.child.signal(signal.SIGKILL)
        await wait_for_map(local.etcd_endpoint, local.cluster,
                           lambda t: victim.node_id not in t.addresses, 30, "victim gone")
        await asyncio.sleep(1.5)
        await acked_at_least(len(acked) + 60)
        stop_enqueue.set()
        await asyncio.gather(*enqueuers)
        async with asyncio.timeout(60):  # every acknowledged job completes
            for job_id in sorted(acked):
                while True:
                    if (await nodes.job(job_id)).state == pb.JOB_STATE_SUCCEEDED:
                        break
                    await asyncio.sleep(0.1)
    finally:
        stop_enqueue.set()
        stop_work.set()
        await asyncio.gather(*enqueuers, *working, return_exceptions=True)
    assert len(acked) > 100
    assert acked <= set(processed)
    twice = sorted(j for j, n in processed.items() if n > 1)
    print(f"\n{len(acked)} jobs acknowledged, all completed; {len(twice)} ran more than "
          f"once (their lease was lost in the failover)")
    assert len(twice) <= len(acked) // 10


async def test_a_one_second_cron_fires_each_tick_once_across_a_failover(mesh3: Any) -> None:
    local, nodes = mesh3
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    victim = local.nodes[1]
    queue = table.key_led_by(victim.node_id, "acc-cron")
    created = await nodes.retry(lambda s: s.CreateSchedule(pb.CreateScheduleRequest(
        queue=queue, schedule_id="every-second", cron="* * * * * *",
        template=pb.JobTemplate(type="tick")), timeout=3))
    assert created.schedule.next_fire_time.seconds > 0
    await asyncio.sleep(4.0)
    victim.child.signal(signal.SIGKILL)
    await wait_for_map(local.etcd_endpoint, local.cluster,
                       lambda t: victim.node_id not in t.addresses, 30, "victim gone")
    await asyncio.sleep(10.0 - 4.0 - LEASE_TTL)
    deleted = await nodes.retry(lambda s: s.DeleteSchedule(pb.DeleteScheduleRequest(
        queue=queue, schedule_id="every-second"), timeout=3))
    assert deleted.deleted

    fired: list[pb.ClaimedJob] = []
    while batch := await nodes.claim(queue, max_jobs=100, wait=0):
        fired += batch
    ticks = sorted([round(at((await nodes.job(j.job_id)).run_time)) for j in fired])
    print(f"\n{len(ticks)} ticks fired, from {ticks[0]} to {ticks[-1]}")
    assert len(ticks) == len(set(ticks)), "a tick fired twice"
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), "a tick never fired"
    assert len(ticks) >= 9
