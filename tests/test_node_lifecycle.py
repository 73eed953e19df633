"""Node processes: registration, health, reflection, clean and unclean exits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aetcd
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import Mesh
from common import grpc_engine
from common.clustermap import wait_settled
from common.etcd import client_for
from common.localmesh import Etcd
from common.membership import node_key
from mesh.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

Connect = Callable[..., Awaitable[Mesh]]


async def _etcd_value(etcd: Etcd, key: bytes) -> bytes | None:
    client: aetcd.Client = client_for([etcd.endpoint])
    try:
        result = await client.get(key)
        return None if result is None else bytes(result.value)
    finally:
        await client.close()


async def test_registers_in_etcd_with_its_address(etcd: Etcd, local_mesh: Any) -> None:
    local = local_mesh(1)
    node = local.nodes[0]
    raw = await _etcd_value(etcd, node_key(local.cluster, node.node_id))
    assert raw is not None
    info = json.loads(raw)
    assert info["address"] == node.address
    assert set(info["services"]) == {"cache", "lock", "events", "scheduler", "notify", "saga"}
    assert info["version"] and info["pid"] == node.pid


def test_starts_grpc_on_the_engine_mesh_runs_on(local_mesh: Any) -> None:
    """gRPC takes its engine from the environment a process starts with, so the
    node must be started with `common.grpc_engine`'s setting (or the operator's)."""
    node = local_mesh(1).nodes[0]
    environ = Path(f"/proc/{node.pid}/environ").read_bytes().split(b"\0")
    wanted = os.environ.get(grpc_engine.VARIABLE, grpc_engine.EXPERIMENTS)
    assert f"{grpc_engine.VARIABLE}={wanted}".encode() in environ


async def test_runs_on_uvloop_and_serves_beside_a_node_on_asyncios_loop(
    local_mesh: Any, mesh_client: Connect
) -> None:
    """A node runs on uvloop unless told otherwise (`common.event_loop`); one started
    with ``--event-loop asyncio`` replicates with it both ways."""
    local = local_mesh(1)
    local.start_node(extra=["--event-loop", "asyncio"])
    await wait_settled(local.etcd_endpoint, local.cluster,
                       [n.node_id for n in local.nodes], replicas=1)
    loops = [n.child.log_path.read_text(encoding="utf-8") for n in local.nodes]
    assert "(uvloop event loop)" in loops[0]
    assert "(asyncio event loop)" in loops[1]
    # R=1 sync on two nodes: every group has its copy on the other one, so each
    # write below is acknowledged only after the other node applied it; as each
    # leads some of the groups, writes cross from either loop to the other.
    client = await mesh_client()
    keys = {f"loop:{i}": f"v{i}".encode() for i in range(200)}
    await client.cache.mset(keys)
    assert await client.cache.mget(list(keys)) == list(keys.values())
    led = [s.entries for s in await client.cache.stats()]
    assert sum(led) == 200 and min(led) > 0, led


async def test_health_reflection_and_every_service_implemented(local_mesh: Any) -> None:
    local = local_mesh(1)
    async with grpc.aio.insecure_channel(local.nodes[0].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mesh.cache.v1.CacheService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflect.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {"mesh.cache.v1.CacheService", "mesh.lock.v1.LockService",
                "mesh.events.v1.EventsService", "mesh.scheduler.v1.SchedulerService",
                "grpc.health.v1.Health"} <= names

        # Every listed service is served: the scheduler checks its input.
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        try:
            await scheduler.Enqueue(scheduler_pb2.EnqueueRequest(queue="", type="t"))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
        else:
            raise AssertionError("Enqueue with an empty queue should be INVALID_ARGUMENT")


async def test_three_nodes_behave_as_one_cache(local_mesh: Any, mesh_client: Connect) -> None:
    local_mesh(3)
    writer = await mesh_client()
    keys = [f"user:{i}" for i in range(300)]
    await writer.cache.mset({k: k.upper() for k in keys})
    stats = await writer.cache.stats()
    assert len(stats) == 3
    assert all(s.entries > 50 for s in stats), [s.entries for s in stats]
    assert sum(s.entries for s in stats) == 300
    # Another client, with its own view of membership, routes the same way.
    reader = await mesh_client()
    assert await reader.cache.mget(keys) == [k.upper().encode() for k in keys]
    # Hash tags keep related keys on one node.
    await writer.cache.mset({"{cart:7}:items": b"3", "{cart:7}:total": b"42"})
    assert writer.route("cache", "{cart:7}:items") == writer.route("cache", "{cart:7}:total")


async def test_sigterm_mid_load_finishes_calls_and_leaves_etcd_at_once(
    etcd: Etcd, local_mesh: Any, mesh_client: Connect
) -> None:
    # A long lease: if the key vanishes quickly, only the revoke can explain it.
    local = local_mesh(2, lease_ttl=60)
    leaving = local.nodes[0]
    mesh = await mesh_client()
    errors: list[BaseException] = []
    done = 0
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while not stop.is_set():
            key = f"load:{w}:{i}"
            try:
                await mesh.cache.set(key, b"v" * 512)
                await mesh.cache.get(key)
                done += 1
            except Exception as exc:
                errors.append(exc)
            i += 1

    workers = [asyncio.create_task(worker(w)) for w in range(16)]
    await asyncio.sleep(1.0)
    before = done
    leaving.child.signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(leaving.child.proc.wait, 20)
    key_now = await _etcd_value(etcd, node_key(local.cluster, leaving.node_id))
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*workers)

    assert exit_code == 0, leaving.child.log_tail()
    assert key_now is None, "the node's key must be revoked on shutdown, not left to expire"
    # Every call either completed on the leaving node or was retried on the other.
    assert errors == [], [(e.code, e.message) for e in errors[:3]]  # type: ignore[attr-defined]
    assert done > before, "the load kept going on the remaining node"
    assert [n.node_id for n in mesh.nodes("cache")] == [local.nodes[1].node_id]


async def test_sigkill_key_expires_with_the_lease(etcd: Etcd, local_mesh: Any) -> None:
    local = local_mesh(1, lease_ttl=2)
    node = local.nodes[0]
    key = node_key(local.cluster, node.node_id)
    node.child.kill()
    assert await _etcd_value(etcd, key) is not None, "a killed node cannot revoke its lease"
    deadline = time.monotonic() + 15
    while await _etcd_value(etcd, key) is not None:
        assert time.monotonic() < deadline, "the key should expire with its 2 s lease"
        await asyncio.sleep(0.2)


async def test_batches_regroup_when_a_node_dies(local_mesh: Any, mesh_client: Connect) -> None:
    """A batch share sent to a dead node is split again by the current owners:
    every key ends up on the node that owns it, so a fresh client finds it."""
    local = local_mesh(3, lease_ttl=2)
    mesh = await mesh_client(timeout=15)
    keys = [f"batch:{i}" for i in range(300)]
    dead = local.nodes[0]
    assert any(mesh.route("cache", k).node_id == dead.node_id for k in keys)
    dead.child.kill()  # still registered until its 2 s lease runs out
    await mesh.cache.mset({k: k for k in keys})
    assert await mesh.cache.mget(keys) == [k.encode() for k in keys]
    fresh = await mesh_client()
    assert len(fresh.nodes("cache")) == 2
    assert await fresh.cache.mget(keys) == [k.encode() for k in keys]


async def test_calls_made_before_any_node_is_up_wait_for_one(
    local_mesh: Any, mesh_client: Connect
) -> None:
    """waitForReady: a client started against an empty cluster keeps a call's
    tries going (nothing was sent) until a node serves it or its deadline passes."""
    mesh = await mesh_client(timeout=30)
    early = asyncio.create_task(mesh.cache.set("ready:k", b"v"))
    await asyncio.sleep(0.5)
    assert not early.done()
    await asyncio.to_thread(local_mesh, 1)
    assert await early >= 1
    assert await mesh.cache.get("ready:k") == b"v"
