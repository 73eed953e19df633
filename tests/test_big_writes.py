"""Big writes that gather for a replica reach it: a replication message never
grows past what the replica accepts (real etcd, coordinator and three nodes,
R = 1 sync)."""

from __future__ import annotations

import asyncio
import itertools
import signal
from typing import Any

import pytest

from common.clustermap import read_map
from common.slots import slot_for

VALUE = b"v" * ((1 << 20) - 64)  # about the largest value a Set takes
WRITES = 40  # 40 MiB: past the 32 MiB a node accepted in one replication message


@pytest.mark.timeout(120)
async def test_big_values_written_while_a_replica_is_paused_all_reach_it(
    local_mesh: Any, mesh_client: Any, etcd: Any
) -> None:
    """Forty 1 MiB Sets to groups node-1 leads and node-2 replicates, made while
    node-2 is paused: they gather for it, and once it runs again they reach it
    in messages it takes and are acknowledged. (Before messages were bounded the
    forty went as one 40 MiB message, node-2 refused it, and the stream broke on
    it again and again: the writes never committed.)"""
    local = local_mesh(3)
    table = await read_map(etcd.endpoint, local.cluster)
    assert table is not None
    keys = []
    for i in itertools.count():
        key = f"big-{i}"
        group = table.group_of_slot(slot_for(key))
        if group is not None and group.primary == "node-1" and group.replicas == ("node-2",):
            keys.append(key)
            if len(keys) == WRITES:
                break
    mesh = await mesh_client(coalesce=False, timeout=30)
    await mesh.cache.set(keys[0], b"warm")  # the route is known
    node_1, node_2 = local.nodes[0], local.nodes[1]
    assert (node_1.node_id, node_2.node_id) == ("node-1", "node-2")

    node_2.child.pause()
    try:
        writes = [asyncio.create_task(mesh.cache.set(key, VALUE)) for key in keys]
        await asyncio.sleep(1.0)  # within its 5 s lease: nothing fails over
        assert not any(w.done() for w in writes)  # each waits for node-2's ack
    finally:
        node_2.child.signal(signal.SIGCONT)
    versions = await asyncio.gather(*writes)
    assert len(versions) == WRITES

    assert "replication stream to node-2 broke" not in node_1.child.log_tail(10_000)
    for key in keys:
        assert await mesh.cache.get(key) == VALUE
