"""The lock service's acceptance scenarios, with real processes throughout.

Real etcd, a coordinator and three nodes (R = 1); lock clients run as separate
processes (tests/lock_worker.py) where the scenario is about a client process
(its death, its pause, twenty of them racing).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from clients import Mesh, UnavailableError
from common.clustermap import read_map, wait_for_map, wait_settled
from common.localmesh import LocalMesh
from common.slots import slot_for
from coordinator.client import admin_client
from mesh.admin.v1 import admin_pb2
from tests.cluster import workers
from tests.lock_history import Op, check

ROOT = Path(__file__).resolve().parent.parent


async def _queued(mesh: Mesh, name: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        info = await mesh.locks.describe(name)
        if len(info.waiters) >= count:
            return
        assert time.monotonic() < deadline, f"{name}: {len(info.waiters)} waiters"
        await asyncio.sleep(0.02)


async def test_twenty_processes_keep_a_file_counter_exact(
    shared_cluster: LocalMesh, tmp_path: Path
) -> None:
    counter, tokens = tmp_path / "counter", tmp_path / "tokens"
    counter.write_text("0")
    tokens.write_text("")
    async with workers(shared_cluster, tmp_path, "tests.lock_worker") as start:
        racers = [await start("counter", "acc:counter", str(counter), str(tokens), "50")
                  for _ in range(20)]
        for racer in racers:
            await racer.line("DONE", timeout=240)
    assert counter.read_text() == "1000"
    granted = [int(t) for t in tokens.read_text().split()]
    assert len(granted) == 1000
    assert all(a < b for a, b in itertools.pairwise(granted)), \
        "tokens did not strictly increase in grant order"


async def test_a_killed_holder_hands_over_within_ttl(
    shared_cluster: LocalMesh, mesh_client: Any, tmp_path: Path
) -> None:
    ttl = 2.0
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    async with workers(shared_cluster, tmp_path, "tests.lock_worker") as start:
        holder = await start("hold", "acc:killed", str(ttl))
        held_token = int((await holder.line("HELD")).split()[1])
        waiting = asyncio.create_task(mesh.locks.acquire("acc:killed", ttl=10.0, wait=30.0))
        await _queued(mesh, "acc:killed", 1)
        killed = time.time()
        holder.signal(signal.SIGKILL)
        lease = await waiting
        # When the node granted it (its own stamp), not when the answer arrived here,
        # which a loaded machine may delay.
        [granted] = (await mesh.locks.describe("acc:killed")).holders
        assert granted.lease_id == lease.lease_id
        handover = granted.acquire_time - killed
    print(f"\nthe waiter got the lock {handover:.2f} s after its holder was killed "
          f"(ttl {ttl} s)")
    assert lease.token > held_token
    assert handover <= ttl + 1.0
    await lease.release()


class FencedResource:
    """A store that accepts a write only if Validate says its token is live."""

    def __init__(self, mesh: Mesh, name: str) -> None:
        self.mesh = mesh
        self.name = name
        self.accepted: list[tuple[float, int]] = []
        self.refused: list[tuple[float, int]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            token = int(line)
            ok = await self.mesh.locks.validate(self.name, token)
            (self.accepted if ok else self.refused).append((time.monotonic(), token))
            writer.write(b"OK\n" if ok else b"REFUSED\n")
            await writer.drain()
        writer.close()


async def test_a_paused_holder_past_its_ttl_is_refused(
    shared_cluster: LocalMesh, mesh_client: Any, tmp_path: Path
) -> None:
    ttl = 1.5
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    resource = FencedResource(mesh, "acc:paused")
    server = await asyncio.start_server(resource.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with workers(shared_cluster, tmp_path, "tests.lock_worker") as start:
            holder = await start("guarded", "acc:paused", str(ttl), str(port))
            old = int((await holder.line("HELD")).split()[1])
            await holder.line("OK")
            holder.signal(signal.SIGSTOP)
            stopped = time.monotonic()
            # Another client gets the lock once the paused holder's lease ran out.
            lease = await mesh.locks.acquire("acc:paused", ttl=30.0, wait=3 * ttl)
            assert lease.token > old
            holder.signal(signal.SIGCONT)
            await holder.line("REFUSED")
            await asyncio.sleep(0.5)
    finally:
        server.close()
    late = [token for at, token in resource.accepted if at > stopped]
    assert late == [], "a write with the expired token was accepted"
    assert any(token == old for _, token in resource.refused)
    await lease.release()


async def test_primary_killed_while_held_and_awaited(
    local_mesh: Any, mesh_client: Any
) -> None:
    name = "acc:failover"
    local = local_mesh(3, lease_ttl=2)
    mesh = await mesh_client(timeout=20)
    table = mesh.table
    assert table is not None
    group = table.group_of_slot(slot_for(name))
    assert group is not None
    victim = next(n for n in local.nodes if n.node_id == group.primary)
    history: list[Op] = []

    async def waiter(client: str, rounds: int) -> None:
        for _ in range(rounds):
            invoke = time.monotonic()
            lease = await mesh.locks.acquire(name, ttl=6.0, wait=60.0, owner=client)
            history.append(Op(client, "acquire", invoke, time.monotonic(), lease.token))
            await asyncio.sleep(0.05)
            history.append(Op(client, "release", time.monotonic(), time.monotonic()))
            await lease.release()

    invoke = time.monotonic()
    # Not refreshed until the failover settled: the ttl must outlast the failover
    # (about 3 s, and more on a slow machine), or the lease is presumed lost.
    held = await mesh.locks.acquire(name, ttl=20.0, owner="holder")
    history.append(Op("holder", "acquire", invoke, time.monotonic(), held.token))
    waiters = [asyncio.create_task(waiter(f"w{i}", 3)) for i in range(3)]
    await _queued(mesh, name, 3)

    victim.child.signal(signal.SIGKILL)
    survivors = [n.node_id for n in local.nodes if n is not victim]
    await wait_settled(local.etcd_endpoint, local.cluster, survivors, timeout=30)
    # The holder still holds it: its refresh works at the new primary.
    await held.refresh()
    assert held.held and not held.lost.is_set()
    info = await mesh.locks.describe(name)
    assert [h.lease_id for h in info.holders] == [held.lease_id]
    history.append(Op("holder", "release", time.monotonic(), time.monotonic()))
    await held.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 60)

    assert check(history) == []
    after = [op.token for op in history if op.kind == "acquire" and op.client != "holder"]
    assert len(after) == 9 and min(after) > held.token


async def test_tokens_keep_growing_while_every_node_is_restarted(
    local_mesh: Any, mesh_client: Any
) -> None:
    name = "acc:rolling"
    local = local_mesh(3, lease_ttl=2)
    mesh = await mesh_client(timeout=20)
    tokens = []
    async with mesh.lock(name, ttl=6.0) as held:
        for node in list(local.nodes):
            await asyncio.to_thread(node.child.stop)  # keep the loop (and refreshes) running
            others = [n.node_id for n in local.nodes if n is not node and n.child.alive()]
            await wait_settled(local.etcd_endpoint, local.cluster, others, timeout=30)
            restarted = await asyncio.to_thread(local.start_node, node.node_id)
            local.nodes.remove(node)
            await wait_settled(local.etcd_endpoint, local.cluster,
                               [n.node_id for n in local.nodes if n.child.alive()],
                               timeout=30)
            assert restarted.child.alive()
            await held.refresh()  # held all along, across each failover
            lease = await mesh.locks.acquire(f"{name}:other", ttl=5.0)
            tokens.append(lease.token)
            await lease.release()
        assert held.held
    assert all(a < b for a, b in itertools.pairwise(tokens))
    fresh = await mesh.locks.acquire(name, ttl=5.0)
    assert fresh.token > held.token
    await fresh.release()


async def test_tokens_keep_growing_after_every_node_dies_and_lost_groups_are_recovered(
    local_mesh: Any, mesh_client: Any
) -> None:
    name = "acc:total-loss"
    local = local_mesh(3, lease_ttl=2)
    mesh = await mesh_client(timeout=3)
    before = await mesh.locks.acquire(name, ttl=30.0)  # held when everything dies
    await mesh.cache.set("acc:total-loss:key", b"v")
    ids = [n.node_id for n in local.nodes]
    for node in local.nodes:
        node.child.signal(signal.SIGKILL)
    await wait_for_map(local.etcd_endpoint, local.cluster,
                       lambda t: not any(g.primary for g in t.groups.values()), 30,
                       "every group lost")
    local.nodes.clear()
    # New machines: the old nodes (and their disks) never come back, so nothing
    # can revive the groups on its own.
    ids = [f"{node_id}-new" for node_id in ids]
    for node_id in ids:
        await asyncio.to_thread(local.start_node, node_id)
    await wait_for_map(local.etcd_endpoint, local.cluster,
                       lambda t: sorted(t.addresses) == sorted(ids), 30, "nodes back")
    with pytest.raises(UnavailableError):  # lost groups stay lost until an operator acts
        await mesh.locks.try_acquire(name, ttl=5.0, timeout=1.0)

    every_group = sorted((await _table(local)).groups)
    async with admin_client(local.etcd_endpoint, local.cluster) as admin:
        dry = await admin.RecoverLostGroups(admin_pb2.RecoverLostGroupsRequest(dry_run=True))
        assert sorted(dry.group_ids) == every_group and dry.epoch == 0
        done = await admin.RecoverLostGroups(admin_pb2.RecoverLostGroupsRequest())
        assert sorted(done.group_ids) == every_group and done.epoch > 0
    await wait_settled(local.etcd_endpoint, local.cluster, ids, timeout=30)

    after = await mesh.locks.acquire(name, ttl=5.0, wait=5.0)  # the old lease died too
    assert after.token > before.token
    assert await mesh.cache.get("acc:total-loss:key") is None  # recreated empty
    await after.release()


async def _table(local: LocalMesh) -> Any:
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    return table
