"""Rebalance time: a 4th node joins 3 nodes (R=1) that hold N keys.

The keys (100-byte values) are loaded with mset in batches of 1000. The clock
starts when the 4th node is launched and stops at the first map that is settled
over all four nodes (every group with one in-sync replica, no move pending).
Then every key must still read back with its value.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench import aio, clusters
from clients import Mesh
from common.clustermap import wait_settled
from common.slots import SLOT_COUNT

BATCH = 1000
IN_FLIGHT = 4
VALUE_BYTES = 100
SETTLE_TIMEOUT = 240.0
SPEC = clusters.Spec("rebalance", replicas=1)


@dataclass(frozen=True)
class Result:
    """What the join took and what it left."""

    keys: int
    load_s: float
    node_ready_s: float
    """Launch -> the new node's READY line (process start-up, registration)."""
    settled_s: float
    """Launch -> a settled map over four nodes."""
    new_node_slot_share: float
    new_node_groups: int
    groups: int
    keys_read_back: int


def _key(i: int) -> str:
    return f"rb:{i:07d}"


def _value(i: int) -> bytes:
    return (b"%07d." % i * (VALUE_BYTES // 8 + 1))[:VALUE_BYTES]


async def _batches(keys: int, job: Callable[[range], Awaitable[int]]) -> int:
    """Run ``job`` on every BATCH-sized range of indexes, IN_FLIGHT at a time; sum results."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(part: range) -> int:
        async with gate:
            return await job(part)

    parts = [range(s, min(s + BATCH, keys)) for s in range(0, keys, BATCH)]
    return sum(await asyncio.gather(*(one(p) for p in parts)))


async def _load(etcd: str, keys: int) -> None:
    async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=30) as mesh:
        async def store(part: range) -> int:
            await mesh.cache.mset([(_key(i), _value(i)) for i in part])
            return len(part)

        await _batches(keys, store)


async def _read_back(etcd: str, keys: int) -> int:
    async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=30) as mesh:
        async def fetch(part: range) -> int:
            values = await mesh.cache.mget([_key(i) for i in part])
            return sum(v == _value(i) for i, v in zip(part, values, strict=True))

        return await _batches(keys, fetch)


def run(workdir: Path, etcd: str, keys: int) -> Result:
    """Load ``keys`` into 3 nodes, start a 4th, time the move, check the data."""
    with contextlib.ExitStack() as stack:
        local = clusters.start_one(stack, workdir, etcd, SPEC)
        started = time.monotonic()
        aio.run(_load(etcd, keys))
        load_s = time.monotonic() - started

        launched = time.monotonic()
        # From this thread: a child started by a worker thread dies with that thread.
        fourth = clusters.add_node(local, SPEC)
        ready_s = time.monotonic() - launched
        table = aio.run(wait_settled(etcd, SPEC.name, [n.node_id for n in local.nodes],
                                         SPEC.replicas, SETTLE_TIMEOUT))
        settled_s = time.monotonic() - launched

        read_back = aio.run(_read_back(etcd, keys))
    result = Result(
        keys, load_s, ready_s, settled_s, table.primary_slots().get(fourth.node_id, 0) / SLOT_COUNT,
        sum(g.primary == fourth.node_id for g in table.groups.values()), len(table.groups),
        read_back)
    print(f"[rebalance] {keys:,} keys loaded in {load_s:.2f} s; 4th node settled after "
          f"{settled_s:.2f} s, leads {result.new_node_slot_share:.1%} of slots; "
          f"{read_back:,} of {keys:,} keys read back", file=sys.stderr, flush=True)
    return result
