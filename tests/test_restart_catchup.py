"""A node restarted with its data dir catches up from its disk, not a full copy.

Three nodes, two replicas per group (every node holds every group). One node is
SIGKILLed after a few megabytes of events, misses some writes while it is away,
and comes back with the same data dir: its event store and scheduler continue
from what its disk holds and replay the missed commands from the primaries'
logs; only the in-memory services (cache, locks) are copied. Then it is the last
node standing, and serves every acknowledged event and cache key itself.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.event_types import NewEvent
from common.clustermap import read_map, wait_for_map, wait_settled
from common.slots import slot_for

pytestmark = pytest.mark.timeout(180)

STREAMS = 4
ROUNDS = 140  # 4 streams x 700 events of 4 kB: 2.8 MB per group, more than
# a node's command logs keep here (LOG_BYTES for all its groups), so a replica
# without the disk would need a full snapshot
EVENT_BYTES = 4000
LOG_BYTES = ["--replication-log-bytes", str(2 << 20)]


async def _snapshots(address: str) -> dict[tuple[str, str], float]:
    """``{(name, kind): value}`` of the node's snapshot counters."""
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        if family.name.startswith("mesh_replication_snapshot"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[(sample.name, sample.labels["kind"])] = sample.value
    return found


class Workload:
    """Events (about 11 MB) and cache keys in the groups of a few streams."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        # Hash tags put each stream's cache keys in its group, which then has both
        # kinds of state.
        self.acked: dict[str, list[str]] = {f"{{catchup-{i}}}": [] for i in range(STREAMS)}
        self.values: dict[str, bytes] = {}

    async def write(self, rounds: int, tag: str) -> None:
        payload = b"e" * EVENT_BYTES
        for r in range(rounds):
            for stream, ids in self.acked.items():
                batch = [NewEvent(type="Filled", data=payload) for _ in range(5)]
                await self.mesh.events.append(stream, batch)
                ids.extend(e.id for e in batch)
                key = f"{stream}:{tag}-{r}"
                await self.mesh.cache.set(key, key.encode())
                self.values[key] = key.encode()

    @property
    def stored(self) -> int:
        return sum(len(ids) for ids in self.acked.values()) * EVENT_BYTES


async def _kill_and_restart(local: Any, work: Workload, replicas: int) -> tuple[Any, dict[
        tuple[str, str], float]]:
    """SIGKILL a node holding a stream, write while it is away, restart it with its data dir;
    returns it and its snapshot counters once the map is settled again."""
    await work.write(ROUNDS, "before")
    # A member of a stream's group (with more nodes than copies, not every node is).
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    group = table.group_of_slot(slot_for(next(iter(work.acked))))
    assert group is not None
    victim = next(n for n in local.nodes if n.node_id in (group.primary, *group.replicas))
    victim.child.kill()  # SIGKILL: nothing is flushed on the way out
    local.nodes.remove(victim)
    others = [n.node_id for n in local.nodes]
    # The coordinator sees it gone, and writes go on without it.
    await wait_for_map(local.etcd_endpoint, local.cluster,
                       lambda t: victim.node_id not in t.addresses, timeout=30)
    await work.write(4, "away")
    started = time.monotonic()
    back = await asyncio.to_thread(local.start_node, victim.node_id, LOG_BYTES)
    await wait_settled(local.etcd_endpoint, local.cluster, [*others, back.node_id],
                       replicas=replicas, timeout=60)
    caught_up = time.monotonic() - started
    counts = await _snapshots(back.metrics)
    deadline = time.monotonic() + 10
    while not any(counts.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # the counters are summed up once a second
        counts = await _snapshots(back.metrics)
    print(f"\n{len(others) + 1} nodes, R={replicas}: the restarted node was in sync "
          f"after {caught_up:.1f} s; in-memory snapshots "
          f"{counts[('mesh_replication_snapshots_total', 'in_memory')]:.0f} of "
          f"{counts[('mesh_replication_snapshot_bytes_total', 'in_memory')]:.0f} bytes, "
          f"full ones {counts[('mesh_replication_snapshots_total', 'full')]:.0f} of "
          f"{counts[('mesh_replication_snapshot_bytes_total', 'full')]:.0f} bytes, for "
          f"{work.stored} bytes of events")
    return back, counts


async def test_a_restarted_node_catches_up_from_its_disk(
        local_mesh: Any, mesh_client: Any) -> None:
    """Every node holds every group: the node gets all its groups back."""
    local = local_mesh(3, LOG_BYTES, lease_ttl=2, replicas=2)
    work = Workload(await mesh_client())
    back, counts = await _kill_and_restart(local, work, replicas=2)
    full = counts[("mesh_replication_snapshots_total", "full")]
    in_memory = counts[("mesh_replication_snapshots_total", "in_memory")]
    copied = counts[("mesh_replication_snapshot_bytes_total", "in_memory")]
    assert full == 0 and in_memory >= STREAMS and copied > 0
    assert copied < work.stored / 100  # the events were not copied again

    # The proof that its copy is whole: it is the last node left, and serves it all.
    for node in list(local.nodes):
        if node is not back:
            node.child.kill()
            local.nodes.remove(node)
    await wait_for_map(
        local.etcd_endpoint, local.cluster,
        lambda t: set(t.addresses) == {back.node_id} and all(
            g.primary == back.node_id for g in t.groups.values()), timeout=30)
    for stream, ids in work.acked.items():
        stored_ids = [e.id async for e in work.mesh.events.read_stream(stream)]
        assert stored_ids == ids, stream
    for key, value in work.values.items():
        assert await work.mesh.cache.get(key) == value, key


async def test_a_returning_node_is_seated_in_the_groups_it_kept(
        local_mesh: Any, mesh_client: Any) -> None:
    """More nodes than copies: while it was away its groups were copied to the
    others; back, it registers the groups its disk holds and the coordinator
    gives it those rather than others, so they catch up from the log."""
    local = local_mesh(4, LOG_BYTES, lease_ttl=2, replicas=1)
    work = Workload(await mesh_client())
    _, counts = await _kill_and_restart(local, work, replicas=1)
    full = counts[("mesh_replication_snapshots_total", "full")]
    in_memory = counts[("mesh_replication_snapshots_total", "in_memory")]
    assert in_memory > 0 and full <= 1  # at most one seat goes to a group it lacks
