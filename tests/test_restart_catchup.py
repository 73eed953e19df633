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
from common.clustermap import wait_for_map, wait_settled

pytestmark = pytest.mark.timeout(180)

STREAMS = 12
EVENT_BYTES = 4000


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


async def test_a_restarted_node_catches_up_from_its_disk(
        local_mesh: Any, mesh_client: Any) -> None:
    local = local_mesh(3, lease_ttl=2, replicas=2)
    mesh = await mesh_client()
    payload = b"e" * EVENT_BYTES
    # Hash tags put each stream's cache keys in its group, which then has both
    # kinds of state.
    acked: dict[str, list[str]] = {f"{{catchup-{i}}}": [] for i in range(STREAMS)}
    values: dict[str, bytes] = {}

    async def write(rounds: int, tag: str) -> None:
        for r in range(rounds):
            for stream, ids in acked.items():
                batch = [NewEvent(type="Filled", data=payload) for _ in range(5)]
                await mesh.events.append(stream, batch)
                ids.extend(e.id for e in batch)
                key = f"{stream}:{tag}-{r}"
                await mesh.cache.set(key, key.encode())
                values[key] = key.encode()

    await write(40, "before")  # 12 x 200 events of 4 kB: about 10 MB of events
    victim = local.nodes[-1]
    victim.child.kill()  # SIGKILL: nothing is flushed on the way out
    local.nodes.remove(victim)
    others = [n.node_id for n in local.nodes]
    # The coordinator sees it gone, and writes go on without it.
    await wait_for_map(local.etcd_endpoint, local.cluster,
                       lambda t: victim.node_id not in t.addresses, timeout=30)
    await write(4, "away")

    started = time.monotonic()
    back = await asyncio.to_thread(local.start_node, victim.node_id)
    await wait_settled(local.etcd_endpoint, local.cluster, [*others, back.node_id],
                       replicas=2, timeout=60)
    caught_up = time.monotonic() - started
    counts = await _snapshots(back.metrics)
    deadline = time.monotonic() + 10
    while not any(counts.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # the counters are summed up once a second
        counts = await _snapshots(back.metrics)
    full = counts[("mesh_replication_snapshots_total", "full")]
    in_memory = counts[("mesh_replication_snapshots_total", "in_memory")]
    copied = counts[("mesh_replication_snapshot_bytes_total", "in_memory")]
    stored = sum(len(ids) for ids in acked.values()) * EVENT_BYTES
    print(f"\nrestarted node: in sync after {caught_up:.1f} s; {in_memory:.0f} in-memory "
          f"snapshots of {copied:.0f} bytes and {full:.0f} full ones, for {stored} bytes "
          f"of events")
    assert full == 0 and in_memory >= STREAMS and copied > 0
    assert copied < stored / 100  # the events were not copied again

    # The proof that its copy is whole: it is the last node left, and serves it all.
    for node in list(local.nodes):
        if node is not back:
            node.child.kill()
            local.nodes.remove(node)
    await wait_for_map(
        local.etcd_endpoint, local.cluster,
        lambda t: set(t.addresses) == {back.node_id} and all(
            g.primary == back.node_id for g in t.groups.values()), timeout=30)
    for stream, ids in acked.items():
        stored_ids = [e.id async for e in mesh.events.read_stream(stream)]
        assert stored_ids == ids, stream
    for key, value in values.items():
        assert await mesh.cache.get(key) == value, key
