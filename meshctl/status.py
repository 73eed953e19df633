"""``meshctl status``: one line per registered node (health, cache keys, and figures
read from its /metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from clients import Mesh
from common.membership import NodeInfo
from mesh.cache.v1 import cache_pb2, cache_pb2_grpc


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    address: str
    services: tuple[str, ...]
    health: str
    keys: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    """Sums of the node's metric families, by name ({} if it serves none)."""
    silent: tuple[str, ...] = ()
    """Replica nodes it reports as not answering it (`NodeInfo.stalled`)."""


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
                    cache_pb2.StatsRequest(), timeout=timeout, metadata=mesh.call_metadata())
                keys = stats.entries
            except grpc.aio.AioRpcError:
                pass
        return NodeStatus(node_id, address, services, health, keys)

    async def with_metrics(info: NodeInfo) -> NodeStatus:
        status = replace(await one(info.node_id, info.address, info.services),
                         silent=info.stalled)
        if info.metrics:
            with contextlib.suppress(OSError):
                status.metrics.update(await asyncio.to_thread(scrape, info.metrics, timeout))
        return status

    nodes = sorted(mesh.directory.nodes.values(), key=lambda n: n.node_id)
    return list(await asyncio.gather(*(with_metrics(n) for n in nodes)))


def scrape(address: str, timeout: float) -> dict[str, float]:
    """``http://address/metrics``, each family summed over its samples (the _total,
    _count and _sum samples of counters and histograms kept apart)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def format_status(rows: list[NodeStatus]) -> list[str]:
    """One line per node under a header."""
    lines = [f"{'NODE':<16} {'ADDRESS':<22} {'HEALTH':<12} {'KEYS':>8} {'LEASES':>7} "
             f"{'RPCS':>9}  SERVICES"]
    for r in rows:
        keys = "-" if r.keys is None else str(r.keys)
        leases = _figure(r.metrics, "mesh_lock_leases")
        rpcs = _figure(r.metrics, "mesh_rpc_requests_total")
        lines.append(f"{r.node_id:<16} {r.address:<22} {r.health:<12} {keys:>8} {leases:>7} "
                     f"{rpcs:>9}  {','.join(r.services)}")
    for r in rows:
        if r.silent:
            lines.append(f"{r.node_id}: not answered by {', '.join(r.silent)}; the groups it "
                         "leads get other replicas (their writes wait until those are in sync)")
    return lines


def node_dict(r: NodeStatus) -> dict[str, object]:
    """A node's row as JSON (``status -o json``: the ``nodes`` list); figures the node
    does not export are null."""
    def figure(name: str) -> int | None:
        return int(r.metrics[name]) if name in r.metrics else None

    return {"node_id": r.node_id, "address": r.address, "services": list(r.services),
            "health": r.health, "keys": r.keys, "lock_leases": figure("mesh_lock_leases"),
            "rpcs": figure("mesh_rpc_requests_total"), "silent_replicas": list(r.silent)}


async def print_status(mesh: Mesh) -> int:
    rows = await collect(mesh)
    if not rows:
        print("no nodes registered")
        return 1
    print("\n".join(format_status(rows)))
    return 0 if all(r.health == "SERVING" for r in rows) else 1


def _figure(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name]:.0f}" if name in metrics else "-"
