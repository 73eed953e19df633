"""Cost as data grows: memory per cache key against Redis, and a replica's catch-up.

One node (``--replicas 1``, alone so far) and a redis-server of its own are
loaded with the same N keys of 100 bytes, by mset in batches of 1000. All keys
carry one hash tag, so they live in one group: the biggest a group gets.

- Memory: the node's RSS growth per key against Redis's ``used_memory`` growth
  per key (the ratio is Mesh's cost in Redis units; Redis keeps no replication
  log and no per-key version, Mesh keeps both).
- Catch-up: a second node is launched; the clock stops at the first map that is
  settled over both (the new node an in-sync replica of every group, the big one
  included). Meanwhile a prober reads one key of the big group in a loop; its
  latencies during the catch-up are compared with the same probe's before it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis.asyncio

from bench import aio, clusters
from bench.services import start_redis
from clients import Mesh
from common.clustermap import wait_settled

BATCH = 1000
IN_FLIGHT = 4
VALUE_BYTES = 100
TAG = "{growth}"
SETTLE_TIMEOUT = 300.0
BASELINE_PROBE_S = 2.0
SPEC = clusters.Spec("growth", nodes=1, replicas=1)
SETUP = (f"one node (R=1, alone until a second joins) and redis-server, {VALUE_BYTES}-byte "
         f"values loaded by mset in batches of {BATCH}, every key in one group")
GOAL = 3.0
"""Mesh's bytes per key at most this many times Redis's (the performance issue's goal)."""


@dataclass(frozen=True)
class Result:
    """What the keys cost and what the catch-up took."""

    keys: int
    load_s: float
    node_bytes_per_key: float
    redis_bytes_per_key: float
    """Growth of Redis's ``used_memory`` (what the goal compares with)."""
    redis_rss_bytes_per_key: float
    """Growth of Redis's RSS (its allocator's overhead included, as in the node's)."""
    ratio: float
    replica_bytes_per_key: float
    """The new node's RSS growth per key once it is in sync."""
    node_ready_s: float
    settled_s: float
    """Launch of the second node -> a settled map over both."""
    get_before_ms: dict[str, float]
    get_during_ms: dict[str, float]
    get_errors_during: int


def _key(i: int) -> str:
    return f"{TAG}:{i:08d}"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _load(etcd: str, redis_port: int, keys: int) -> tuple[int, int]:
    """Load the keys into the mesh and into Redis; Redis's ``used_memory`` and
    ``used_memory_rss`` growth."""
    value = b"v" * VALUE_BYTES
    gate = asyncio.Semaphore(IN_FLIGHT)
    server = redis.asyncio.Redis(port=redis_port)
    try:
        await server.flushall()
        before = await server.info("memory")
        async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=30) as mesh:
            async def one(start: int) -> None:
                async with gate:
                    batch = {_key(i): value for i in range(start, min(start + BATCH, keys))}
                    await asyncio.gather(mesh.cache.mset(batch), server.mset(batch))

            await asyncio.gather(*(one(s) for s in range(0, keys, BATCH)))
        after = await server.info("memory")
        return (int(after["used_memory"]) - int(before["used_memory"]),
                int(after["used_memory_rss"]) - int(before["used_memory_rss"]))
    finally:
        await server.aclose()


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    p99 = latencies[0] if len(latencies) == 1 else \
        statistics.quantiles(latencies, n=100, method="inclusive")[98]  # never past the max
    return {"n": len(latencies), "p50": round(statistics.median(latencies) * 1e3, 2),
            "p99": round(p99 * 1e3, 2), "max": round(max(latencies) * 1e3, 2)}


class Prober:
    """A process of its own reading one key in a loop and writing each read's end
    (``time.monotonic``, shared by every process) and latency, or ``error``, to a
    file: the benchmark's own thread stays free to launch and wait for nodes."""

    def __init__(self, etcd: str, key: str, out: Path) -> None:
        self.out = out
        with out.open("w") as sink:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "bench.growth", "--probe", key, "--etcd", etcd],
                stdout=sink, cwd=Path(__file__).resolve().parent.parent)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=30)

    def window(self, start: float, end: float) -> tuple[list[float], int]:
        """The latencies of reads that ended in ``[start, end)``, and the errors."""
        latencies: list[float] = []
        errors = 0
        for line in self.out.read_text().splitlines():
            at, _, what = line.partition(" ")
            if not start <= float(at) < end:
                continue
            if what == "error":
                errors += 1
            else:
                latencies.append(float(what))
        return latencies, errors


async def _probe(etcd: str, key: str) -> None:
    """The prober's loop (``--probe``): until SIGTERM, which ends it between two
    reads (an exception raised wherever the signal lands could stall the exit)."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=5) as mesh:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await mesh.cache.get(key)
            except Exception:  # any failure counts; the probe goes on
                print(f"{time.monotonic():.6f} error", flush=True)
                await asyncio.sleep(0.01)
                continue
            ended = time.monotonic()
            print(f"{ended:.6f} {ended - started:.6f}", flush=True)


def run(workdir: Path, etcd: str, keys: int) -> Result:
    """Load ``keys`` into one node and Redis, compare memory, then time a replica's
    catch-up under a read probe."""
    with contextlib.ExitStack() as stack:
        local = clusters.start_one(stack, workdir, etcd, SPEC)
        first = local.nodes[0]
        redis_port = start_redis(stack, workdir / SPEC.name)
        rss_before = _rss(first.pid)
        started = time.monotonic()
        redis_bytes, redis_rss = aio.run(_load(etcd, redis_port, keys))
        load_s = time.monotonic() - started
        time.sleep(1.0)  # let the allocator settle before reading RSS
        node_bytes = _rss(first.pid) - rss_before

        prober = Prober(etcd, _key(keys // 2), workdir / SPEC.name / "probe.txt")
        stack.callback(prober.stop)
        time.sleep(BASELINE_PROBE_S)

        launched = time.monotonic()
        # From this thread: a child started by a worker thread dies with that thread.
        second = clusters.add_node(local, SPEC)
        ready_s = time.monotonic() - launched
        replica_before = _rss(second.pid)
        aio.run(wait_settled(etcd, SPEC.name, [n.node_id for n in local.nodes],
                             SPEC.replicas, SETTLE_TIMEOUT))
        settled = time.monotonic()
        settled_s = settled - launched
        prober.stop()
        before, _ = prober.window(0.0, launched)
        during, errors = prober.window(launched, settled)
        time.sleep(1.0)
        replica_bytes = _rss(second.pid) - replica_before
    result = Result(
        keys, round(load_s, 3), round(node_bytes / keys, 1), round(redis_bytes / keys, 1),
        round(redis_rss / keys, 1), round(node_bytes / redis_bytes, 3),
        round(replica_bytes / keys, 1),
        round(ready_s, 3), round(settled_s, 3), _percentiles(before), _percentiles(during),
        errors)
    print(f"[growth] {keys:,} keys: node {result.node_bytes_per_key:,.0f} B/key, Redis "
          f"{result.redis_bytes_per_key:,.0f} B/key ({result.ratio:.2f}x); a replica caught "
          f"up in {settled_s:.2f} s; GET p99 {result.get_before_ms['p99']:.2f} ms before, "
          f"{result.get_during_ms['p99']:.2f} ms during", file=sys.stderr, flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.growth",
                                description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--probe", metavar="KEY", help=argparse.SUPPRESS)
    p.add_argument("--etcd", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        aio.run(_probe(args.etcd, args.probe))
        return 0
    with clusters.scratch_etcd("mesh-growth-") as (tmp, etcd):
        print(json.dumps(asdict(run(tmp, etcd, args.keys)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
