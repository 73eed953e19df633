"""Cost as the cluster grows: placement balance, coordinator CPU per map change,
and how long a new map takes to reach every node.

- Balance: the coordinator's own placement (`coordinator.placement.place`, as
  `initial_map` runs it) of G groups on N nodes, R=1: the busiest node's
  primaries over the mean. Groups move whole, so the floor is ceil(G/N)/(G/N).
- CPU per map change: `coordinator.reconcile.next_map` for one node joining N
  (placement, the new map, its serialization), in CPU seconds of this process.
- Fan-out: W watchers of the map key (`common.etcd.PrefixFollower`, the watch
  under every node's and client's `MapFollower`, each with its own etcd client)
  on a real etcd; a new map of G groups is put, and the clock stops when the last
  watcher has it. Parsing it (`RoutingTable.parse`) is timed once beside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import aio
from common.clustermap import RoutingTable, map_key
from common.etcd import PrefixFollower, client_for
from common.localmesh import Etcd
from common.membership import NodeInfo
from coordinator.placement import Assignment, place
from coordinator.reconcile import Facts, initial_map, next_map

REPLICAS = 1
CLUSTER = "scale"


@dataclass(frozen=True)
class Sizes:
    """What to measure: group counts, node counts, followers, map changes."""

    groups: tuple[int, ...] = (256, 1024, 4096)
    nodes: tuple[int, ...] = (10, 50, 200)
    followers: int = 100
    changes: int = 5
    fanout_groups: int = 4096
    fanout_nodes: int = 50


QUICK = Sizes(groups=(256, 4096), nodes=(10, 50), followers=10, changes=2)


def _registered(count: int) -> dict[str, NodeInfo]:
    return {f"node-{i:03d}": NodeInfo(f"node-{i:03d}", f"10.0.{i // 250}.{i % 250}:7000",
                                      ("cache",), "bench")
            for i in range(count)}


def balance(groups: int, nodes: int) -> float:
    """Busiest node's primaries / the mean, for a fresh placement."""
    blank = {g: Assignment("", ()) for g in range(1, groups + 1)}
    plan = place(blank, sorted(_registered(nodes)), REPLICAS)
    busiest = max(Counter(a.primary for a in plan.values()).values())
    return round(busiest / (groups / nodes), 3)


def join_cpu(groups: int, nodes: int) -> dict[str, float]:
    """CPU seconds and map bytes of the coordinator's step for one node joining."""
    registered = _registered(nodes)
    current = initial_map(registered, groups, REPLICAS, now=0.0)
    grown = _registered(nodes + 1)
    started = time.process_time()
    new = next_map(current, grown, Facts(), REPLICAS, now=1.0)
    assert new is not None
    size = len(new.SerializeToString())
    return {"cpu_s": round(time.process_time() - started, 4), "map_bytes": size}


async def fanout(etcd: str, sizes: Sizes) -> dict[str, Any]:
    """Seconds from the put of a new map until the last of the watchers has it,
    and what parsing it costs one node (followers parse on their own machines,
    so the parse is timed once, not once per watcher in this one process)."""
    arrived: dict[int, int] = {}
    everyone = asyncio.Event()
    last_arrival = 0.0

    def on_event(kind: str, key: bytes, value: bytes, revision: int) -> None:
        nonlocal last_arrival
        arrived[revision] = arrived.get(revision, 0) + 1
        if arrived[revision] == sizes.followers:
            last_arrival = time.monotonic()
            everyone.set()

    clients = [client_for(etcd) for _ in range(sizes.followers + 1)]
    watchers: list[PrefixFollower] = []
    writer = clients[-1]
    cmap = initial_map(_registered(sizes.fanout_nodes), sizes.fanout_groups, REPLICAS, now=0.0)
    try:
        for client in clients:
            await client.connect()
        for client in clients[:-1]:
            watcher = PrefixFollower(client, map_key(CLUSTER), lambda kvs: None, on_event,
                                     name="bench-map-watcher")
            await watcher.start()
            watchers.append(watcher)
        times: list[float] = []
        for _ in range(sizes.changes):
            cmap.epoch += 1
            data = cmap.SerializeToString()
            everyone.clear()
            put = time.monotonic()
            await writer.put(map_key(CLUSTER), data)
            await asyncio.wait_for(everyone.wait(), 30)
            times.append(last_arrival - put)
        parse = time.process_time()
        RoutingTable.parse(data)
        parse_s = time.process_time() - parse
        return {"followers": sizes.followers, "groups": sizes.fanout_groups,
                "map_bytes": len(data), "median_s": round(statistics.median(times), 4),
                "max_s": round(max(times), 4), "parse_cpu_s": round(parse_s, 4)}
    finally:
        for watcher in watchers:
            await watcher.close()
        for client in clients:
            await client.close()


def run(etcd: str, sizes: Sizes) -> dict[str, Any]:
    """Every measure of ``sizes``."""
    rows: list[dict[str, Any]] = []
    for groups in sizes.groups:
        for nodes in sizes.nodes:
            rows.append({"groups": groups, "nodes": nodes,
                         "busiest_over_mean": balance(groups, nodes),
                         "join": join_cpu(groups, nodes)})
            print(f"[scale] {groups} groups on {nodes} nodes: busiest/mean "
                  f"{rows[-1]['busiest_over_mean']:.3f}, a join costs "
                  f"{rows[-1]['join']['cpu_s']:.3f} CPU s", file=sys.stderr, flush=True)
    spread = aio.run(fanout(etcd, sizes))
    print(f"[scale] a {spread['map_bytes']:,}-byte map reached {spread['followers']} watchers "
          f"in {spread['median_s'] * 1e3:.0f} ms (median); parsing it takes "
          f"{spread['parse_cpu_s'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return {"setup": f"R={REPLICAS}; one process's CPU; {sizes.followers} map followers, "
                     f"each with its own etcd client, on one etcd",
            "placement": rows, "fanout": spread}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mesh-scale-") as tmp, \
            contextlib.ExitStack() as stack:
        etcd = Etcd(Path(tmp) / "etcd")
        etcd.workdir.mkdir()
        stack.callback(etcd.stop)
        etcd.start()
        print(json.dumps(run(etcd.endpoint, QUICK if args.quick else Sizes()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
