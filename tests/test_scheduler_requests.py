"""Enqueue's request_id with real processes: a retry gets the first job back after
the job completed, after its primary was SIGKILLed, after every node restarted, and
from a replica that caught up by snapshot.

Calls go through the raw generated stub to any live node (it forwards), as a
client in any language would.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from common.clustermap import read_map, wait_for_map, wait_settled
from common.slots import slot_for
from mesh.scheduler.v1 import scheduler_pb2 as pb
from tests.cluster import error_details
from tests.test_restart_catchup import _snapshots
from tests.test_scheduler_acceptance import Nodes

pytestmark = pytest.mark.timeout(180)


async def _enqueue(nodes: Nodes, queue: str, request_id: str, payload: bytes = b""
                   ) -> pb.EnqueueResponse:
    request = pb.EnqueueRequest(queue=queue, type="t", payload=payload, request_id=request_id)
    return await nodes.retry(lambda s: s.Enqueue(request, timeout=3))


async def _complete(nodes: Nodes, queue: str, job_id: str) -> None:
    [job] = await nodes.claim(queue)
    assert job.job_id == job_id
    request = pb.CompleteRequest(job_id=job_id, lease_token=job.lease_token)
    await nodes.retry(lambda s: s.Complete(request, timeout=3))


def _replayed(reply: pb.EnqueueResponse, job_id: str) -> bool:
    return reply.job_id == job_id and reply.replayed and not reply.duplicate


@pytest.fixture
async def mesh3(local_mesh: Any) -> Any:
    local = local_mesh(3, lease_ttl=2)
    nodes = Nodes(local)
    try:
        yield local, nodes
    finally:
        await nodes.close()


async def test_a_replay_gets_the_first_job_even_completed_and_makes_no_other(
        mesh3: Any) -> None:
    _, nodes = mesh3
    queue, rid = "req-done", str(uuid.uuid4())
    first = await _enqueue(nodes, queue, rid, b"one")
    assert not first.replayed and first.state == pb.JOB_STATE_PENDING
    await _complete(nodes, queue, first.job_id)
    again = await _enqueue(nodes, queue, rid, b"two")
    assert _replayed(again, first.job_id) and again.state == pb.JOB_STATE_SUCCEEDED
    stats = await nodes.retry(lambda s: s.Stats(pb.StatsRequest(queue=queue), timeout=3))
    assert (stats.ready, stats.done) == (0, 1)  # nothing was enqueued by the replay
    other = await _enqueue(nodes, queue, str(uuid.uuid4()))
    assert not other.replayed and other.job_id != first.job_id


@pytest.mark.parametrize(("request_id", "problem"), [("r" * 129, "128 bytes"),
                                                     ("a\tb", "control")])
async def test_a_bad_request_id_is_invalid_argument_naming_it(
        mesh3: Any, request_id: str, problem: str) -> None:
    _, nodes = mesh3
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await nodes.stub().Enqueue(pb.EnqueueRequest(queue="q", type="t",
                                                     request_id=request_id), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, _, violations = error_details(refused.value)
    assert reason == "INVALID_ARGUMENT" and list(violations) == ["request_id"]
    assert problem in violations["request_id"]
    assert "r" * 129 not in (refused.value.details() or "")  # not echoed


async def test_a_replay_after_the_primary_is_sigkilled_gets_the_same_job(mesh3: Any) -> None:
    local, nodes = mesh3
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    victim = local.nodes[1]
    queue = table.key_led_by(victim.node_id, "req-failover")
    rids = [str(uuid.uuid4()) for _ in range(5)]
    first = [(await _enqueue(nodes, queue, rid)).job_id for rid in rids]
    victim.child.kill()  # SIGKILL right after the answers: the commits are all it had
    local.nodes.remove(victim)
    await wait_for_map(local.etcd_endpoint, local.cluster,
                       lambda t: victim.node_id not in t.addresses, 30, "victim gone")
    for rid, job_id in zip(rids, first, strict=True):
        assert _replayed(await _enqueue(nodes, queue, rid), job_id)
    stats = await nodes.retry(lambda s: s.Stats(pb.StatsRequest(queue=queue), timeout=3))
    assert stats.ready == len(rids)


async def test_every_node_restarting_keeps_the_request_ids(mesh3: Any) -> None:
    local, nodes = mesh3
    queues = [f"req-restart-{i}" for i in range(6)]
    first = {q: (await _enqueue(nodes, q, f"rid-{q}")).job_id for q in queues}
    await _complete(nodes, queues[0], first[queues[0]])
    ids = [n.node_id for n in local.nodes]
    for node in local.nodes:
        node.child.kill()  # SIGKILL, reaped
    local.nodes.clear()
    for node_id in ids:  # the same machines come back, with their disks
        await asyncio.to_thread(local.start_node, node_id)
    await wait_settled(local.etcd_endpoint, local.cluster, ids, timeout=60)
    for queue, job_id in first.items():
        assert _replayed(await _enqueue(nodes, queue, f"rid-{queue}"), job_id), queue


async def test_a_replica_that_caught_up_by_snapshot_knows_the_request_ids(
        local_mesh: Any) -> None:
    # Logs of one command each: a new replica can only be built from a snapshot.
    local = local_mesh(2, lease_ttl=2, replicas=1, extra=["--replication-log-bytes", "1"])
    nodes = Nodes(local)
    try:
        queues = [f"req-snap-{i}" for i in range(40)]
        first = {q: (await _enqueue(nodes, q, f"rid-{q}")).job_id for q in queues}
        for queue in queues[:5]:
            await _complete(nodes, queue, first[queue])
        newcomer = await asyncio.to_thread(local.start_node, "node-3",
                                           ["--replication-log-bytes", "1"])
        ids = [n.node_id for n in local.nodes]
        table = await wait_settled(local.etcd_endpoint, local.cluster, ids, timeout=60)
        moved = [q for q in queues if (g := table.group_of_slot(slot_for(q))) is not None
                 and newcomer.node_id in (g.primary, *g.replicas)]
        assert moved, "the new node holds none of the queues"
        counts = await _snapshots(newcomer.metrics)
        async with asyncio.timeout(15):  # the counters are summed up once a second
            while not counts.get(("mesh_replication_snapshots_total", "full")):
                await asyncio.sleep(0.5)
                counts = await _snapshots(newcomer.metrics)
        # The copies it got are all that is left of those queues: the old nodes go.
        group = table.group_of_slot(slot_for(moved[0]))
        assert group is not None
        other = next(n for n in local.nodes
                     if n.node_id in (group.primary, *group.replicas) and n is not newcomer)
        other.child.kill()
        local.nodes.remove(other)
        after = await wait_for_map(
            local.etcd_endpoint, local.cluster,
            lambda t: other.node_id not in t.addresses
            and (g := t.group_of_slot(slot_for(moved[0]))) is not None
            and g.primary == newcomer.node_id, 30, "the newcomer leads")
        led = [q for q in moved if (g := after.group_of_slot(slot_for(q))) is not None
               and g.primary == newcomer.node_id]
        assert moved[0] in led
        for queue in led:
            reply = await _enqueue(nodes, queue, f"rid-{queue}")
            assert _replayed(reply, first[queue]), queue
    finally:
        await nodes.close()
