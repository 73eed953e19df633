"""Every node and coordinator serves Prometheus /metrics, and the series move with calls."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families

from clients import InvalidArgumentError, Mesh
from common.localmesh import LocalMesh
from coordinator.client import admin_client
from mesh.admin.v1 import admin_pb2
from mesh.events.v1 import events_pb2, events_pb2_grpc
from mesh.lock.v1 import lock_pb2, lock_pb2_grpc
from mesh.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from meshctl.status import scrape

Connect = Callable[..., Awaitable[Mesh]]

SET_OK = 'mesh_rpc_requests_total{code="OK",method="/mesh.cache.v1.CacheService/Set"}'


async def _series(address: str) -> dict[str, float]:
    """Every sample of ``address``'s /metrics, by name and labels."""
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    series: dict[str, float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            series[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return series


async def _eventually(address: str, check: Callable[[dict[str, float]], bool]) -> None:
    """Gauges are summed up once a second: poll until ``check`` holds (or fail)."""
    deadline = time.monotonic() + 10
    while True:
        series = await _series(address)
        if check(series):
            return
        assert time.monotonic() < deadline, series
        await asyncio.sleep(0.2)


async def test_node_metrics_move_with_calls(shared_node: LocalMesh, mesh_client: Connect) -> None:
    node = shared_node.nodes[0]
    assert node.metrics
    mesh = await mesh_client(cluster=shared_node.cluster)
    before = await _series(node.metrics)
    await mesh.cache.set("metrics:k", b"v")
    await mesh.cache.get("metrics:k")
    await mesh.cache.get("metrics:missing")
    with pytest.raises(InvalidArgumentError):
        await mesh.cache.set("", b"v")
    lease = await mesh.locks.acquire("metrics:lock", ttl=30)
    waiter = asyncio.create_task(mesh.locks.acquire("metrics:lock", ttl=30, wait=20))
    async with grpc.aio.insecure_channel(node.address) as channel:
        await events_pb2_grpc.EventsServiceStub(channel).Append(events_pb2.AppendRequest(
            stream="metrics-1", events=[events_pb2.EventData(id="e1", type="T"),
                                        events_pb2.EventData(id="e2", type="T")]))
        await scheduler_pb2_grpc.SchedulerServiceStub(channel).Enqueue(
            scheduler_pb2.EnqueueRequest(queue="metrics-q", type="T"))

    def moved(series: dict[str, float]) -> bool:
        return (series.get(SET_OK, 0) >= before.get(SET_OK, 0) + 1
                and series.get('mesh_rpc_requests_total{code="INVALID_ARGUMENT",'
                               'method="/mesh.cache.v1.CacheService/Set"}', 0) >= 1
                and series["mesh_cache_hits_total"] >= before["mesh_cache_hits_total"] + 1
                and series["mesh_cache_misses_total"] >= before["mesh_cache_misses_total"] + 1
                and series["mesh_lock_leases"] >= 1 and series["mesh_lock_waiters"] >= 1
                and series["mesh_events_appended_total"]
                >= before.get("mesh_events_appended_total", 0) + 2
                and series["mesh_journal_flushes_total"]
                > before.get("mesh_journal_flushes_total", 0)
                and series["mesh_events_streams"] >= 1
                and series['mesh_scheduler_jobs{state="ready"}'] >= 1
                and series['mesh_slots{role="primary"}'] == 16384
                and series["mesh_map_epoch"] >= 1)

    await _eventually(node.metrics, moved)
    series = await _series(node.metrics)
    bucket = ('mesh_rpc_duration_seconds_count{code="OK",'
              'method="/mesh.cache.v1.CacheService/Set"}')
    assert series[bucket] >= 1
    await lease.release()
    await (await waiter).release()
    await _eventually(node.metrics, lambda s: s["mesh_lock_leases"] == 0
                      and s["mesh_lock_waiters"] == 0)


async def test_coordinator_metrics(shared_node: LocalMesh) -> None:
    coordinator = shared_node.coordinators[0]
    async with admin_client(shared_node.etcd_endpoint, shared_node.cluster) as admin:
        await admin.Status(admin_pb2.StatusRequest())
    status_ok = 'mesh_rpc_requests_total{code="OK",method="/mesh.admin.v1.AdminService/Status"}'
    await _eventually(coordinator.metrics, lambda s: s["mesh_coordinator_leader"] == 1
                      and s["mesh_map_epoch"] >= 1 and s['mesh_nodes{state="ACTIVE"}'] == 1
                      and s["mesh_groups_lost"] == 0 and s.get(status_ok, 0) >= 1)
    # What meshctl status reads: sums per sample name.
    sums = await asyncio.to_thread(scrape, coordinator.metrics, 5.0)
    assert sums["mesh_rpc_requests_total"] >= 1


async def test_a_cancelled_call_is_counted_as_cancelled(shared_node: LocalMesh) -> None:
    node = shared_node.nodes[0]
    async with grpc.aio.insecure_channel(node.address) as channel:
        stub = lock_pb2_grpc.LockServiceStub(channel)
        held = await stub.Acquire(lock_pb2.AcquireRequest(name="metrics:cancel"))
        call = stub.Acquire(lock_pb2.AcquireRequest(
            name="metrics:cancel", wait_timeout=duration_pb2.Duration(seconds=30)), timeout=35)
        # Cancelled once the node has it queued (a fixed pause could end, on a loaded
        # machine, before the call even reached the node, which would then count nothing).
        deadline = time.monotonic() + 10
        while not (await stub.Describe(lock_pb2.DescribeRequest(name="metrics:cancel"))).waiters:
            assert time.monotonic() < deadline, "the waiting Acquire never reached the node"
            await asyncio.sleep(0.02)
        call.cancel()
        await stub.Release(lock_pb2.ReleaseRequest(name="metrics:cancel",
                                                   lease_id=held.lease_id))
    await _eventually(node.metrics, lambda s: s.get(
        'mesh_rpc_requests_total{code="CANCELLED",method="/mesh.lock.v1.LockService/Acquire"}',
        0) >= 1)


REPLICATION = ("mesh_replication_messages_sent_total", "mesh_replication_batches_sent_total",
               "mesh_replication_commands_sent_total",
               "mesh_replication_ack_messages_received_total",
               "mesh_replication_acks_received_total")


async def _replication_sums(local: LocalMesh) -> dict[str, float]:
    """The replication stream counters, summed over ``local``'s nodes (read live)."""
    nodes = [await _series(node.metrics) for node in local.nodes]
    return {name: sum(series[name] for series in nodes) for name in REPLICATION}


async def test_concurrent_replicated_writes_share_replication_messages(
        local_mesh: Callable[..., LocalMesh], mesh_client: Connect) -> None:
    """200 Sets in flight at once, each its own call (no client coalescing): every
    one is replicated, in fewer messages than commands, and the counters say so."""
    local = local_mesh(2, replicas=1)
    mesh = await mesh_client(coalesce=False)
    await mesh.cache.set("metrics:warm", b"v")
    before = await _replication_sums(local)
    writes = 200
    await asyncio.gather(*(mesh.cache.set(f"metrics:many:{i}", b"v") for i in range(writes)))
    after = await _replication_sums(local)
    moved = {name: after[name] - before[name] for name in REPLICATION}
    print(f"\n{writes} concurrent Sets: {moved}")
    assert moved["mesh_replication_commands_sent_total"] >= writes
    assert 0 < moved["mesh_replication_messages_sent_total"] \
        < moved["mesh_replication_commands_sent_total"]
    assert moved["mesh_replication_batches_sent_total"] \
        >= moved["mesh_replication_messages_sent_total"]
    assert moved["mesh_replication_ack_messages_received_total"] > 0
    assert moved["mesh_replication_acks_received_total"] \
        >= moved["mesh_replication_ack_messages_received_total"]
