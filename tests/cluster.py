"""Test helpers for whole clusters: reading the map, waiting for it to settle, a writer
that records every acknowledged write, and checks that replicas hold what primaries do."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import Mesh
from clients.errors import MeshError
from common.clustermap import RoutingTable, map_key
from common.etcd import client_for
from common.slots import slot_for
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.replication.v1 import replication_pb2_grpc as rpb_grpc


async def read_map(etcd_endpoint: str, cluster: str) -> RoutingTable | None:
    client = client_for([etcd_endpoint])
    try:
        found = await client.get(map_key(cluster))
        return RoutingTable.parse(found.value) if found is not None else None
    finally:
        await client.close()


def settled(table: RoutingTable, nodes: Iterable[str], replicas: int = 1) -> bool:
    """Every group led by one of ``nodes``, fully replicated among them, no move pending."""
    members = set(nodes)
    want = min(replicas, len(members) - 1)
    if set(table.addresses) != members:
        return False
    for group in table.proto.groups:
        if group.HasField("target") or group.primary_node_id not in members:
            return False
        if len(group.replicas) != want or not all(r.in_sync for r in group.replicas):
            return False
        if any(r.node_id not in members for r in group.replicas):
            return False
    return bool(table.groups)


async def wait_for_map(etcd_endpoint: str, cluster: str,
                       predicate: Callable[[RoutingTable], bool], timeout: float,
                       what: str = "the map") -> RoutingTable:
    deadline = time.monotonic() + timeout
    table = None
    while time.monotonic() < deadline:
        try:
            table = await read_map(etcd_endpoint, cluster)
        except Exception:  # etcd restarting: keep polling until the deadline
            table = None
        if table is not None and predicate(table):
            return table
        await asyncio.sleep(0.1)
    epoch = table.epoch if table is not None else None
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (epoch {epoch})")


async def wait_settled(etcd_endpoint: str, cluster: str, nodes: Iterable[str],
                       replicas: int = 1, timeout: float = 30.0) -> RoutingTable:
    node_set = set(nodes)
    return await wait_for_map(etcd_endpoint, cluster,
                              lambda t: settled(t, node_set, replicas), timeout,
                              f"a settled map over {sorted(node_set)}")


async def wait_serving(addresses: Iterable[str], timeout: float = 10.0) -> None:
    """Wait until every address answers its health check with SERVING."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{address} is not SERVING after {timeout}s")
                await asyncio.sleep(0.05)


def primary_slots(table: RoutingTable) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in table.groups.values():
        counts[group.primary] = counts.get(group.primary, 0) + group.slots
    return counts


def key_led_by(table: RoutingTable, node_id: str, prefix: str = "probe") -> str:
    """A key whose slot's group is led by ``node_id``."""
    for i in itertools.count():
        key = f"{prefix}-{i}"
        group = table.group_of_slot(slot_for(key))
        if group is not None and group.primary == node_id:
            return key
    raise AssertionError("unreachable")


@dataclass
class Writer:
    """Concurrent Set loops on fresh keys; remembers every acknowledged write."""

    mesh: Mesh
    tasks: int = 4
    prefix: str = "w"
    acked: dict[str, bytes] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _running: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._running = [asyncio.create_task(self._loop(i)) for i in range(self.tasks)]

    async def _loop(self, worker: int) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            key, value = f"{self.prefix}{worker}-{n}", f"v{worker}-{n}".encode()
            try:
                await self.mesh.cache.set(key, value)
            except MeshError as exc:
                self.errors.append(exc)
                await asyncio.sleep(0.05)
                continue
            self.acked[key] = value

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._running)

    async def lost(self) -> list[str]:
        """Acknowledged keys that do not read back with their value."""
        keys = sorted(self.acked)
        values = await self.mesh.cache.mget(keys) if keys else []
        return [k for k, v in zip(keys, values, strict=True) if v != self.acked[k]]


async def positions(table: RoutingTable, group_id: int) -> dict[str, tuple[int, int]]:
    """Each member's applied (epoch, seq) for a group."""
    group = table.groups[group_id]
    result: dict[str, tuple[int, int]] = {}
    for node_id in group.members:
        async with grpc.aio.insecure_channel(table.addresses[node_id]) as channel:
            stub = rpb_grpc.ReplicationServiceStub(channel)
            with contextlib.suppress(grpc.aio.AioRpcError):
                p = await stub.GetPosition(rpb.GetPositionRequest(group_id=group_id), timeout=2)
                result[node_id] = (p.applied_epoch, p.applied_seq)
    return result


async def wait_converged(table: RoutingTable, timeout: float = 10.0) -> None:
    """Every member of every group reaches the same applied position (no divergence,
    no lag) once writes have stopped."""
    deadline = time.monotonic() + timeout
    pending = set(table.groups)
    while pending and time.monotonic() < deadline:
        for group_id in list(pending):
            found = await positions(table, group_id)
            if len(found) == len(table.groups[group_id].members) \
                    and len(set(found.values())) == 1:
                pending.discard(group_id)
        if pending:
            await asyncio.sleep(0.2)
    assert not pending, f"groups whose members disagree: {sorted(pending)[:10]}"
