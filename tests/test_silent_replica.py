"""A replica that stops answering while its node keeps its etcd lease is replaced
(real etcd, coordinator and three nodes, R = 1 sync; the multi-host version of
this, a cut link, is in `tests/test_partitions.py`)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from typing import Any

import pytest

from common.clustermap import read_map, wait_for_map
from common.slots import slot_for
from tests.cluster import Writer

STALL = 2.0  # --replica-stall-timeout: seconds of silence before node-1 reports node-2


@pytest.mark.timeout(120)
async def test_a_replica_paused_within_its_lease_is_replaced_and_writes_go_on(
    local_mesh: Any, mesh_client: Any, etcd: Any
) -> None:
    """node-2 paused (SIGSTOP) with 30 s left on its lease, as a hung disk or a
    stuck process: membership still says it is fine. The groups node-1 leads and
    node-2 replicates stop taking writes until node-1 reports node-2 silent and
    node-3's copy takes its place; then they take writes while node-2 is still
    paused. Once node-2 runs again nothing acknowledged is missing, and node-2 is
    no longer a member of those groups."""
    local = local_mesh(3, lease_ttl=30, extra=["--replica-stall-timeout", str(STALL)])
    table = await read_map(etcd.endpoint, local.cluster)
    assert table is not None
    shared = {g.group_id for g in table.groups.values()
              if g.primary == "node-1" and g.replicas == ("node-2",)}
    assert shared
    key = next(k for i in itertools.count() if (
        group := table.group_of_slot(slot_for(k := f"silent-{i}"))) is not None
        and group.group_id in shared)
    mesh = await mesh_client(timeout=10)
    await mesh.cache.set(key, b"before")
    writer = Writer(mesh, prefix="paused")
    writer.start()
    await writer.acked_at_least(20)
    node_2 = local.nodes[1]
    node_2.child.pause()
    paused = time.monotonic()
    try:
        for attempt in itertools.count():  # the first ones wait for node-2
            try:
                await mesh.cache.set(key, f"during-{attempt}".encode(), timeout=1.0)
                break
            except Exception:
                assert time.monotonic() - paused < 25, "writes never came back"
        back = time.monotonic() - paused
        moved = await wait_for_map(etcd.endpoint, local.cluster, lambda t: all(
            t.groups[g].replicas == ("node-3",) for g in shared), 10, "node-3 in node-2's place")
        assert all(moved.groups[g].primary == "node-1" for g in shared)
        acked = len(writer.acked)
        await writer.acked_at_least(acked + 20)  # node-2 still paused
        print(f"\nnode-2 paused within its lease: writes to the groups node-1 leads on it "
              f"again after {back:.2f} s (reported after {STALL} s of silence)")
    finally:
        node_2.child.signal(signal.SIGCONT)
    await asyncio.sleep(1.0)
    await writer.stop()
    assert await writer.lost() == []
    assert await mesh.cache.get(key) is not None
    assert "answered nothing" in local.nodes[0].child.log_tail(10_000)
