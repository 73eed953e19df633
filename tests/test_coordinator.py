"""Coordinators against a real etcd: election, takeover, fenced map writes, admin API.

Coordinator and node processes are real children on free ports, each test on
its own cluster name; the mapstore test runs two elections in-process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.errors import InvalidArgumentError, MeshError, from_rpc_error
from common.clustermap import DEFAULT_GROUP_COUNT, RoutingTable, leader_key, map_key, wait_for_map
from common.etcd import client_for
from common.localmesh import CoordinatorProcess, Etcd, LocalMesh
from coordinator.election import Election, Leadership
from coordinator.mapstore import Deposed, MapConflict, MapStore
from mesh.admin.v1 import admin_pb2
from mesh.admin.v1 import admin_pb2_grpc as admin_grpc

MeshFactory = Callable[[], LocalMesh]
TTL = 1


@pytest.fixture
def bare_mesh(etcd: Etcd, tmp_path: Path, cluster_name: str,
               request: pytest.FixtureRequest) -> Iterator[MeshFactory]:
    """``bare_mesh()``: a LocalMesh on the session etcd with nothing started yet (the
    tests start coordinators and nodes themselves, in their own order)."""
    started: list[LocalMesh] = []

    def make() -> LocalMesh:
        local = LocalMesh(workdir=tmp_path / f"mesh{len(started)}", cluster=cluster_name,
                          lease_ttl=2, _owns_workdir=False)
        local.workdir.mkdir()
        local.etcd_endpoint = etcd.endpoint
        started.append(local)
        return local

    try:
        yield make
    finally:
        failed = any(getattr(request.node, f"rep_{w}", None) is not None
                     and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
        for local in started:
            if failed:
                print(f"\n===== process logs ({cluster_name}) =====\n{local.logs()}")
            local.stop()


@pytest.fixture
async def channels() -> AsyncIterator[Callable[[str], admin_grpc.AdminServiceStub]]:
    opened: list[grpc.aio.Channel] = []

    def stub(address: str) -> admin_grpc.AdminServiceStub:
        channel = grpc.aio.insecure_channel(address)
        opened.append(channel)
        return admin_grpc.AdminServiceStub(channel)

    yield stub
    for channel in opened:
        await channel.close()


async def call_error(call: Any) -> MeshError:
    """The MeshError a failing admin call raises (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return from_rpc_error(info.value)


async def wait_map(etcd: Etcd, cluster: str, predicate: Callable[[RoutingTable], bool],
                   timeout: float, what: str) -> RoutingTable:
    return await wait_for_map(etcd.endpoint, cluster, predicate, timeout, what)


async def leader_id(stub: admin_grpc.AdminServiceStub) -> str:
    reply: admin_pb2.StatusResponse = await stub.Status(admin_pb2.StatusRequest(), timeout=3)
    return reply.leader_id


async def wait_leader(stub: admin_grpc.AdminServiceStub, want: str, timeout: float) -> float:
    """Seconds until ``stub``'s coordinator reports ``want`` as leader."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await leader_id(stub) == want:
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"{want} did not become leader within {timeout}s")


def coordinators(local: LocalMesh, count: int, *extra: str) -> list[CoordinatorProcess]:
    return [local.start_coordinator(["--lease-ttl", str(TTL), *extra]) for _ in range(count)]


# -- election, takeover, NOT_LEADER ------------------------------------------------------


async def test_one_leader_and_takeover_after_sigkill(
        bare_mesh: MeshFactory, etcd: Etcd,
        channels: Callable[[str], admin_grpc.AdminServiceStub]) -> None:
    local = bare_mesh()
    first, second = coordinators(local, 2)
    stubs = {c.coordinator_id: channels(c.address) for c in (first, second)}
    await wait_leader(stubs[first.coordinator_id], first.coordinator_id, 5)
    # Exactly one leads, and both agree on which.
    assert {await leader_id(s) for s in stubs.values()} == {first.coordinator_id}

    local.start_node("n1")
    table = await wait_map(etcd, local.cluster, lambda t: "n1" in t.addresses, 10, "map with n1")
    epoch_before = table.epoch

    # The follower answers Status itself and everything else with NOT_LEADER.
    follower = stubs[second.coordinator_id]
    status = await follower.Status(admin_pb2.StatusRequest(), timeout=3)
    assert status.coordinator_id == second.coordinator_id
    assert status.leader_address == first.address and status.etcd.healthy
    for call in (follower.GetTopology(admin_pb2.GetTopologyRequest(), timeout=3),
                 follower.ListNodes(admin_pb2.ListNodesRequest(), timeout=3),
                 follower.Drain(admin_pb2.DrainRequest(node_id="n1"), timeout=3),
                 follower.Rebalance(admin_pb2.RebalanceRequest(dry_run=True), timeout=3)):
        error = await call_error(call)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "NOT_LEADER"
        assert error.metadata == {"leader_id": first.coordinator_id,
                                  "leader_address": first.address}
    stream = follower.WatchTopology(admin_pb2.WatchTopologyRequest(), timeout=3)
    error = await call_error(stream.read())
    assert error.reason == "NOT_LEADER"

    first.child.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    took = await wait_leader(follower, second.coordinator_id, TTL + 8)
    print(f"\nleader takeover after SIGKILL: {took:.2f}s (lease TTL {TTL}s)")
    assert took <= TTL + 4  # the lease's expiry, with room for a loaded machine

    # The new leader writes the map: a node joining now shows up, at a higher epoch.
    local.start_node("n2")
    table = await wait_map(etcd, local.cluster, lambda t: "n2" in t.addresses, 10, "map with n2")
    assert table.epoch > epoch_before
    topology = await follower.GetTopology(admin_pb2.GetTopologyRequest(), timeout=5)
    assert {n.node_id for n in topology.cluster_map.nodes} == {"n1", "n2"}


async def test_sigterm_resigns_at_once(
        bare_mesh: MeshFactory, channels: Callable[[str], admin_grpc.AdminServiceStub]
) -> None:
    local = bare_mesh()
    # A long lease: only an explicit resignation explains a quick takeover.
    first = local.start_coordinator(["--lease-ttl", "10"])
    second = local.start_coordinator(["--lease-ttl", "10"])
    follower = channels(second.address)
    await wait_leader(follower, first.coordinator_id, 5)
    start = time.monotonic()
    assert first.child.stop() == 0
    await wait_leader(follower, second.coordinator_id, 6)
    took = time.monotonic() - start
    print(f"\nleader takeover after SIGTERM: {took:.2f}s (lease TTL 10s)")
    # A lease left to expire would go at least 10 s less a keepalive interval (~3.3 s)
    # after the stop; 6 s leaves a loaded machine room and still tells them apart.
    assert took < 6


# -- fenced map writes --------------------------------------------------------------------


async def test_a_deposed_leaders_map_write_is_rejected_by_etcd(
        etcd: Etcd, cluster_name: str) -> None:
    client = client_for([etcd.endpoint])
    idle = asyncio.Event()

    async def work(term: Leadership) -> None:
        await idle.wait()

    a = Election(client, cluster_name, "a", "a:1", TTL, work)
    b = Election(client, cluster_name, "b", "b:1", TTL, work)
    try:
        await a.start()
        term_a = await a.wait_leading(5)
        assert term_a is not None
        await b.start()
        store_a = MapStore(client, cluster_name, term_a.create_revision)
        assert await store_a.load() is None
        await store_a.write(admin_pb2.ClusterMap(epoch=1))

        # A loses its term (here it resigns; a lease running out while A is paused
        # looks the same to etcd) and B is elected, while A still holds its store.
        await a.close()
        term_b = await b.wait_leading(5)
        assert term_b is not None and term_b.create_revision > term_a.create_revision
        store_b = MapStore(client, cluster_name, term_b.create_revision)
        assert (await store_b.load()).epoch == 1  # type: ignore[union-attr]
        await store_b.write(admin_pb2.ClusterMap(epoch=2))

        with pytest.raises(Deposed):
            await store_a.write(admin_pb2.ClusterMap(epoch=2))
        kv = await client.get(map_key(cluster_name))
        assert kv is not None and admin_pb2.ClusterMap.FromString(kv.value).epoch == 2

        # Within one term, a write based on a stale read is refused too.
        stale = MapStore(client, cluster_name, term_b.create_revision)
        await stale.load()
        await store_b.write(admin_pb2.ClusterMap(epoch=3))
        with pytest.raises(MapConflict):
            await stale.write(admin_pb2.ClusterMap(epoch=3))
        leader = await client.get(leader_key(cluster_name))
        assert leader is not None and json.loads(leader.value)["id"] == "b"
    finally:
        await a.close()
        await b.close()
        await client.close()


# -- admin API ----------------------------------------------------------------------------


async def test_admin_validation_and_status(
        bare_mesh: MeshFactory, channels: Callable[[str], admin_grpc.AdminServiceStub]
) -> None:
    local = bare_mesh()
    (coordinator,) = coordinators(local, 1, "--min-nodes", "2")
    stub = channels(coordinator.address)
    await wait_leader(stub, coordinator.coordinator_id, 5)

    error = await call_error(stub.Drain(admin_pb2.DrainRequest(node_id=""), timeout=3))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.field_violations) == ["node_id"]  # type: ignore[attr-defined]
    error = await call_error(stub.Drain(admin_pb2.DrainRequest(node_id="ghost"), timeout=3))
    assert error.code == grpc.StatusCode.NOT_FOUND and error.reason == "NODE_NOT_FOUND"

    # Below --min-nodes there is no map yet: an empty, honest answer everywhere.
    local.start_node("n1")
    await asyncio.sleep(0.8)
    status = await stub.Status(admin_pb2.StatusRequest(), timeout=3)
    assert (status.epoch, status.slots_total, status.slots_covered) == (0, 16384, 0)
    plan = await stub.Rebalance(admin_pb2.RebalanceRequest(dry_run=True), timeout=3)
    assert not plan.moves

    local.start_node("n2")
    watch = stub.WatchTopology(admin_pb2.WatchTopologyRequest(), timeout=10)
    first = await watch.read()
    assert first.cluster_map.epoch >= 1 and len(first.cluster_map.groups) == DEFAULT_GROUP_COUNT
    watch.cancel()
    # A watch from an epoch this cluster never reached says so, not nothing forever.
    ahead = stub.WatchTopology(admin_pb2.WatchTopologyRequest(
        after_epoch=first.cluster_map.epoch + 1000), timeout=10)
    error = await call_error(ahead.read())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(error, InvalidArgumentError) and "after_epoch" in error.field_violations
    status = await stub.Status(admin_pb2.StatusRequest(), timeout=3)
    assert status.slots_covered == 16384 and status.nodes == 2
    nodes = await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=3)
    assert [n.node_id for n in nodes.nodes] == ["n1", "n2"]
    assert sum(n.primary_slots for n in nodes.nodes) == 16384
    # Two nodes, one replica per group: neither can be drained.
    error = await call_error(stub.Drain(admin_pb2.DrainRequest(node_id="n1"), timeout=3))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "NOT_ENOUGH_NODES"


# -- drain, end to end ---------------------------------------------------------------------


async def test_drain_moves_every_role_away_and_the_node_leaves(
        bare_mesh: MeshFactory, etcd: Etcd,
        channels: Callable[[str], admin_grpc.AdminServiceStub]) -> None:
    local = bare_mesh()
    (coordinator,) = coordinators(local, 1, "--min-nodes", "3", "--groups", "32")
    nodes = local.start_nodes(3)
    stub = channels(coordinator.address)
    await wait_map(etcd, local.cluster, lambda t: len(t.addresses) == 3, 10, "first map")

    drained = nodes[1]
    reply = await stub.Drain(admin_pb2.DrainRequest(node_id=drained.node_id, wait=True),
                             timeout=30)
    assert reply.done and reply.primary_slots + reply.replica_slots > 0
    table = await wait_map(etcd, local.cluster, lambda t: drained.node_id not in t.addresses,
                           15, "the drained node to leave the map")
    assert all(drained.node_id not in g.members for g in table.groups.values())
    assert all(len(g.replicas) == 1 for g in table.groups.values())

    # meshctl shows the result.
    for args, expect in ((["topology"], f"{nodes[0].node_id} "), (["status"], "leader coord-1")):
        shown = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshctl", "--etcd", etcd.endpoint, "--cluster", local.cluster,
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(shown.communicate(), 30))[0].decode()
        assert shown.returncode == 0, out
        assert expect in out and f"{drained.node_id} " not in out, out


# -- large maps -------------------------------------------------------------------------


async def test_a_leader_planning_thousands_of_groups_keeps_its_term(
        bare_mesh: MeshFactory, etcd: Etcd) -> None:
    """Placing 4096 groups when a node joined took the coordinator a second or two
    of CPU, on its event loop: the leadership lease went unrenewed, and the leader
    resigned in the middle of the round, and again in every new term. Placement
    now costs it a few hundredths of a second, in a thread; this guards the
    whole join at that size: one term, and the new node gets its share."""
    local = bare_mesh()
    (coordinator,) = coordinators(local, 1, "--lease-ttl", "2", "--min-nodes", "3",
                                  "--groups", "4096")
    local.start_nodes(3)
    await wait_map(etcd, local.cluster, lambda t: len(t.addresses) == 3, 30, "first map")
    joined = local.start_node()
    await wait_map(etcd, local.cluster,
                   lambda t: any(g.primary == joined.node_id for g in t.groups.values()),
                   60, "the new node to lead groups")
    log = coordinator.child.log_path.read_text()
    assert "resigning" not in log and "no longer leader" not in log, log[-3000:]
