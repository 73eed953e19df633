"""The scheduler's batch paths over the wire, against the shared three-node mesh
(R = 1), with the raw generated stub: EnqueueBatch (jobs of queues led by every
node, each with its own result or error), HeartbeatBatch (a lost lease concerns
only its job), CompleteBatch (each completion answered on its own, with its own
next jobs) and Complete / Fail that lease the worker's next jobs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from common.clustermap import read_map
from common.localmesh import LocalMesh
from common.slots import slot_for
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from tests.cluster import error_details

Stub = pb_grpc.SchedulerServiceStub
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _d(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


@pytest.fixture
def stub_at(channel_at: Callable[[str], grpc.aio.Channel]) -> Callable[[str], Stub]:
    return lambda address: Stub(channel_at(address))


@pytest.fixture
def stub(shared_cluster: LocalMesh, stub_at: Any) -> Stub:
    """Any node: most queues are led elsewhere and forwarded."""
    return stub_at(shared_cluster.nodes[0].address)  # type: ignore[no-any-return]


def _job(queue: str, **fields: Any) -> pb.EnqueueRequest:
    fields.setdefault("type", "test.job")
    return pb.EnqueueRequest(queue=queue, **fields)


async def _claim(stub: Stub, *queues: str, max_jobs: int = 1, worker: str = "w1"
                 ) -> list[pb.ClaimedJob]:
    reply = await stub.Claim(pb.ClaimRequest(queues=list(queues), worker_id=worker,
                                             max_jobs=max_jobs, lease_duration=_d(30)))
    return list(reply.jobs)


async def test_enqueue_batch_spans_owners_and_answers_each_job(
        shared_cluster: LocalMesh, stub: Stub) -> None:
    table = await read_map(shared_cluster.etcd_endpoint, shared_cluster.cluster)
    assert table is not None
    queues = [f"batch-enq-{i}" for i in range(12)]
    owners = {g.primary for q in queues if (g := table.group_of_slot(slot_for(q)))}
    assert len(owners) > 1  # some are forwarded
    rid = str(uuid.uuid4())
    jobs = [_job(q, payload=q.encode()) for q in queues] + [
        _job("batch-enq-0", priority=12),                        # 12: bad field
        _job("bad queue"),                                       # 13: bad queue
        _job("batch-enq-1", unique_key="u", strict_unique=True),  # 14: takes the key
        _job("batch-enq-1", unique_key="u", strict_unique=True),  # 15: key held
        _job("batch-enq-2", request_id=rid),                     # 16
        _job("batch-enq-2", request_id=rid),                     # 17: replay of 16
    ]
    reply = await stub.EnqueueBatch(pb.EnqueueBatchRequest(jobs=jobs))
    results = list(reply.results)
    assert len(results) == len(jobs)
    ok = [r.job for r in results if r.HasField("job")]
    assert len(ok) == len(jobs) - 3 and len({j.job_id for j in ok}) == len(ok) - 1
    bad = {i: r.error for i, r in enumerate(results) if r.HasField("error")}
    assert set(bad) == {12, 13, 15}
    assert (bad[12].code, bad[12].reason) == (INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert list(bad[12].field_violations) == ["jobs[12].priority"]
    assert list(bad[13].field_violations) == ["jobs[13].queue"]
    assert (bad[15].code, bad[15].reason) == (ALREADY_EXISTS, "DUPLICATE_JOB")
    assert bad[15].metadata["job_id"] == results[14].job.job_id
    assert results[17].job.replayed and results[17].job.job_id == results[16].job.job_id
    for i, queue in enumerate(queues):  # each job is in its queue, committed
        got = await stub.GetJob(pb.GetJobRequest(job_id=results[i].job.job_id))
        assert (got.job.queue, got.job.payload) == (queue, queue.encode())


async def test_enqueue_batch_refuses_a_bad_batch_whole_and_redirects_self_routers(
        shared_cluster: LocalMesh, stub: Stub) -> None:
    for jobs, field in (([], "jobs"), ([_job("q")] * 1001, "jobs")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.EnqueueBatch(pb.EnqueueBatchRequest(jobs=jobs))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(error_details(refused.value)[2]) == [field]
    # A caller that routes by itself: jobs led elsewhere come back WRONG_OWNER.
    table = await read_map(shared_cluster.etcd_endpoint, shared_cluster.cluster)
    assert table is not None
    here = shared_cluster.nodes[0].node_id
    mine = table.key_led_by(here, "batch-self")
    other = next(q for i in range(100) if (q := f"batch-self-x{i}")
                 and (g := table.group_of_slot(slot_for(q))) and g.primary != here)
    reply = await stub.EnqueueBatch(pb.EnqueueBatchRequest(jobs=[_job(mine), _job(other)]),
                                    metadata=(("x-mesh-route", "client"),))
    first, second = reply.results
    assert first.HasField("job")
    assert (second.error.code, second.error.reason) == (FAILED_PRECONDITION, "WRONG_OWNER")
    assert second.error.metadata["owner_node_id"] == table.groups[
        table.group_of_slot(slot_for(other)).group_id].primary  # type: ignore[union-attr]


async def test_heartbeat_batch_a_lost_lease_affects_only_its_job(stub: Stub) -> None:
    queues = [f"batch-beat-{i}" for i in range(6)]
    await stub.EnqueueBatch(pb.EnqueueBatchRequest(jobs=[_job(q) for q in queues]))
    claimed = [job for q in queues for job in await _claim(stub, q)]
    assert len(claimed) == len(queues)
    lost = claimed[2]
    await stub.Cancel(pb.CancelRequest(job_id=lost.job_id))
    leases = [pb.HeartbeatRequest(job_id=j.job_id, lease_token=j.lease_token, extend=_d(60))
              for j in claimed]
    leases.append(pb.HeartbeatRequest(job_id="{batch-beat-0}zz-zz", lease_token=1))
    reply = await stub.HeartbeatBatch(pb.HeartbeatBatchRequest(leases=leases))
    results = list(reply.results)
    assert len(results) == len(leases)
    for i, (job, r) in enumerate(zip(claimed, results, strict=False)):
        if job is lost:
            assert (r.error.code, r.error.reason) == (FAILED_PRECONDITION, "LEASE_LOST")
            assert r.error.metadata["state"] == "JOB_STATE_CANCELLED"
        else:
            assert r.HasField("lease"), (i, r)
            assert r.lease.lease_expire_time.ToNanoseconds() > \
                job.lease_expire_time.ToNanoseconds()
    assert results[-1].error.reason == "JOB_NOT_FOUND"
    twice = pb.HeartbeatBatchRequest(leases=[leases[0], leases[0]])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.HeartbeatBatch(twice)
    assert list(error_details(refused.value)[2]) == ["leases"]
    for job in claimed:
        if job is not lost:
            await stub.Complete(pb.CompleteRequest(job_id=job.job_id,
                                                   lease_token=job.lease_token))


async def test_complete_batch_spans_owners_and_answers_each_completion(stub: Stub) -> None:
    queues = [f"batch-done-{i}" for i in range(6)]
    await stub.EnqueueBatch(pb.EnqueueBatchRequest(jobs=[_job(q) for q in queues * 2]))
    claimed = [job for q in queues for job in await _claim(stub, q)]
    assert len(claimed) == len(queues)
    lost = claimed[1]
    await stub.Cancel(pb.CancelRequest(job_id=lost.job_id))
    completes = [pb.CompleteRequest(job_id=j.job_id, lease_token=j.lease_token,
                                    result=j.job_id.encode(),
                                    next=pb.ClaimNext(queues=[j.queue], worker_id="w3"))
                 for j in claimed]
    completes[3].result = b"r" * (1024 * 1024 + 1)  # over the limit: refused alone
    completes.append(pb.CompleteRequest(job_id="{batch-done-0}zz-zz", lease_token=1))
    reply = await stub.CompleteBatch(pb.CompleteBatchRequest(completes=completes))
    results = list(reply.results)
    assert len(results) == len(completes)
    assert (results[1].error.code, results[1].error.reason) == (FAILED_PRECONDITION,
                                                                "LEASE_LOST")
    assert list(results[3].error.field_violations) == ["completes[3].result"]
    assert results[-1].error.reason == "JOB_NOT_FOUND"
    for i, (job, r) in enumerate(zip(claimed, results, strict=False)):
        got = (await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))).job
        if i in (1, 3):
            assert got.state != pb.JOB_STATE_SUCCEEDED, i
            continue
        assert r.HasField("completed") and r.completed.HasField("finish_time"), (i, r)
        assert (got.state, got.result) == (pb.JOB_STATE_SUCCEEDED, job.job_id.encode())
        # Each completion leased its own next job, from its own queue.
        (nxt,) = r.completed.next_jobs
        assert nxt.queue == job.queue and nxt.job_id != job.job_id
    twice = pb.CompleteBatchRequest(completes=[completes[0], completes[0]])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CompleteBatch(twice)
    assert list(error_details(refused.value)[2]) == ["completes"]


async def test_complete_and_fail_lease_the_next_jobs(stub: Stub) -> None:
    queue, other = "{batch-next}a", "{batch-next}b"  # one slot, so one owner
    ids = [(await stub.Enqueue(_job(queue, priority=9 - i))).job_id for i in range(4)]
    (first,) = await _claim(stub, queue)
    assert first.job_id == ids[0]
    nxt = pb.ClaimNext(queues=[queue, other, "batch-next-elsewhere"], worker_id="w2",
                       max_jobs=2, lease_duration=_d(20))
    # A bad next is refused before the job is finished.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Complete(pb.CompleteRequest(
            job_id=first.job_id, lease_token=first.lease_token,
            next=pb.ClaimNext(queues=[queue], worker_id="w2", max_jobs=101)))
    assert list(error_details(refused.value)[2]) == ["next.max_jobs"]
    done = await stub.Complete(pb.CompleteRequest(job_id=first.job_id,
                                                  lease_token=first.lease_token, next=nxt))
    assert [j.job_id for j in done.next_jobs] == ids[1:3]
    for job in done.next_jobs:
        got = (await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))).job
        assert (got.state, got.worker_id) == (pb.JOB_STATE_LEASED, "w2")
    assert (await stub.GetJob(pb.GetJobRequest(job_id=first.job_id))).job.state \
        == pb.JOB_STATE_SUCCEEDED
    second = done.next_jobs[0]
    failed = await stub.Fail(pb.FailRequest(job_id=second.job_id, lease_token=second.lease_token,
                                            error="no", retryable=False, next=nxt))
    assert failed.state == pb.JOB_STATE_DEAD
    assert [j.job_id for j in failed.next_jobs] == ids[3:]
    empty = await stub.Complete(pb.CompleteRequest(
        job_id=done.next_jobs[1].job_id, lease_token=done.next_jobs[1].lease_token, next=nxt))
    assert list(empty.next_jobs) == []  # nothing ready: no wait


async def test_a_full_batch_of_one_queue_is_enqueued_in_order(stub: Stub) -> None:
    queue = "batch-full"
    jobs = [_job(queue, payload=str(i).encode()) for i in range(1000)]
    reply = await stub.EnqueueBatch(pb.EnqueueBatchRequest(jobs=jobs), timeout=30)
    ids = [r.job.job_id for r in reply.results]
    assert len(set(ids)) == 1000
    stats = await stub.Stats(pb.StatsRequest(queue=queue))
    assert stats.ready == 1000
    claimed = await _claim(stub, queue, max_jobs=100)
    assert [j.payload for j in claimed] == [str(i).encode() for i in range(100)]  # FIFO


async def test_a_batch_led_by_two_nodes_leases_only_the_next_jobs_its_answer_carries(
        shared_cluster: LocalMesh) -> None:
    # Two completions, one led by the node called and one forwarded to another,
    # each leasing the next jobs of ~1 MB of its own queue: 18 MB each, more
    # than the 32 MiB one answer holds together. The node called gives the
    # forwarded share the room its own answer has left. (Before, each node
    # filled a room of its own; the joined answer was refused after the jobs
    # were leased, and they sat leased until their lease ran out.)
    table = await read_map(shared_cluster.etcd_endpoint, shared_cluster.cluster)
    assert table is not None
    here = shared_cluster.nodes[0]
    mine = table.key_led_by(here.node_id, "split-next")
    theirs = next(q for i in range(100) if (q := f"split-next-x{i}")
                  and (g := table.group_of_slot(slot_for(q))) and g.primary != here.node_id)
    channel = grpc.aio.insecure_channel(
        here.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    try:
        stub = Stub(channel)
        current: list[pb.ClaimedJob] = []
        big: dict[str, str] = {}  # job id -> queue
        for queue in (mine, theirs):
            await stub.Enqueue(_job(queue))
            current += await _claim(stub, queue, worker="w-split")
            reply = await stub.EnqueueBatch(pb.EnqueueBatchRequest(
                jobs=[_job(queue, payload=bytes([i]) * 1_000_000) for i in range(18)]))
            big.update((r.job.job_id, queue) for r in reply.results)
        assert len(current) == 2 and len(big) == 36
        completes = [pb.CompleteRequest(
            job_id=job.job_id, lease_token=job.lease_token,
            next=pb.ClaimNext(queues=[job.queue], worker_id="w-split", max_jobs=100))
            for job in current]
        answer = await stub.CompleteBatch(pb.CompleteBatchRequest(completes=completes))
        carried = {}
        for job, result in zip(current, answer.results, strict=True):
            assert result.HasField("completed"), result
            for nxt in result.completed.next_jobs:
                assert nxt.queue == job.queue
                carried[nxt.job_id] = nxt
        assert 0 < len(carried) < 36
        assert sum(len(j.payload) for j in carried.values()) < 32 << 20
        # Every job leased is in the answer; the rest wait in their queues.
        for job_id in big:
            got = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
            expected = pb.JOB_STATE_LEASED if job_id in carried else pb.JOB_STATE_PENDING
            assert got.state == expected, (job_id, got.state)
    finally:
        await channel.close()
