"""Reading the cluster map from etcd and waiting for it to settle (after tests/cluster.py)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable

from common.clustermap import RoutingTable, map_key
from common.etcd import client_for
from common.slots import SLOT_COUNT, slot_for


def settled(table: RoutingTable, nodes: Iterable[str], replicas: int) -> bool:
    """Every group led by one of ``nodes``, with ``replicas`` in-sync replicas among
    them (fewer if there are not enough nodes), and no move pending."""
    members = set(nodes)
    want = min(replicas, len(members) - 1)
    if set(table.addresses) != members or not table.groups:
        return False
    return all(
        not group.HasField("target") and group.primary_node_id in members
        and len(group.replicas) == want
        and all(r.in_sync and r.node_id in members for r in group.replicas)
        for group in table.proto.groups
    )


async def wait_for_map(etcd: str, cluster: str, predicate: Callable[[RoutingTable], bool],
                       timeout: float, what: str, poll: float = 0.05) -> RoutingTable:
    """Poll etcd until the map satisfies ``predicate``; TimeoutError after ``timeout`` s."""
    client = client_for([etcd])
    deadline = time.monotonic() + timeout
    table: RoutingTable | None = None
    try:
        while time.monotonic() < deadline:
            found = await client.get(map_key(cluster))
            table = RoutingTable.parse(found.value) if found is not None else None
            if table is not None and predicate(table):
                return table
            await asyncio.sleep(poll)
    finally:
        await client.close()
    epoch = table.epoch if table is not None else None
    raise TimeoutError(f"{cluster}: no {what} after {timeout:g} s (map epoch {epoch})")


async def wait_settled(etcd: str, cluster: str, nodes: Iterable[str], replicas: int,
                       timeout: float = 60.0) -> RoutingTable:
    """The first map that is ``settled`` over exactly ``nodes``."""
    members = sorted(set(nodes))
    return await wait_for_map(etcd, cluster, lambda t: settled(t, members, replicas),
                              timeout, f"settled map over {members}")


def slot_share(table: RoutingTable, node_id: str) -> float:
    """The fraction of all slots whose group ``node_id`` leads."""
    slots = sum(g.slots for g in table.groups.values() if g.primary == node_id)
    return slots / SLOT_COUNT


def key_led_by(table: RoutingTable, node_id: str, prefix: str) -> str:
    """The first of ``prefix-0``, ``prefix-1``, ... whose group ``node_id`` leads."""
    if not any(g.primary == node_id for g in table.groups.values()):
        raise ValueError(f"{node_id} leads no group")
    for i in itertools.count():
        key = f"{prefix}-{i}"
        group = table.group_of_slot(slot_for(key))
        if group is not None and group.primary == node_id:
            return key
    raise AssertionError("unreachable")
