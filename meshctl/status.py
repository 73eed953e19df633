"""``meshctl status``: one line per registered node."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import Mesh
from mesh.cache.v1 import cache_pb2, cache_pb2_grpc


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    address: str
    services: tuple[str, ...]
    health: str
    keys: int | None


async def collect(mesh: Mesh, timeout: float = 2.0) -> list[NodeStatus]:
    """Health and cache size of every registered node, asked in parallel."""

    async def one(node_id: str, address: str, services: tuple[str, ...]) -> NodeStatus:
        channel = mesh.channel(address)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout)
            health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            health = exc.code().name
        keys = None
        if "cache" in services and health == "SERVING":
            try:
                stats = await cache_pb2_grpc.CacheServiceStub(channel).Stats(
                    cache_pb2.StatsRequest(), timeout=timeout)
                keys = stats.entries
            except grpc.aio.AioRpcError:
                pass
        return NodeStatus(node_id, address, services, health, keys)

    nodes = sorted(mesh.directory.nodes.values(), key=lambda n: n.node_id)
    return list(await asyncio.gather(*(one(n.node_id, n.address, n.services) for n in nodes)))


async def print_status(mesh: Mesh) -> int:
    rows = await collect(mesh)
    if not rows:
        print("no nodes registered")
        return 1
    print(f"{'NODE':<16} {'ADDRESS':<22} {'HEALTH':<12} {'KEYS':>8}  SERVICES")
    for r in rows:
        keys = "-" if r.keys is None else str(r.keys)
        print(f"{r.node_id:<16} {r.address:<22} {r.health:<12} {keys:>8}  {','.join(r.services)}")
    return 0 if all(r.health == "SERVING" for r in rows) else 1
