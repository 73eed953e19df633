"""Sagas: the saga layer's cost over the scheduler it runs on.

Three nodes (R=1). A saga type of three no-op steps in a row, against the same
three jobs chained by hand through the scheduler: each job's handler enqueues
the next, and the last one tells the benchmark it is done. Both run their
handlers in one worker pool of the same size in this process, with the same
number of sagas (chains) in flight, started back to back; rated in sagas (chains)
completed per second, with p50/p99 from start to end.

What the saga layer adds per step: its decision (a replicated command), the
enqueue from the saga's primary, the worker's report, a committed read of the
job, and the recorded outcome (another command); and per saga the start and
the history appended to the event store.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import aio, clusters
from clients import Mesh
from clients.job_runtime import JobContext
from clients.saga import SagaType, StepContext
from clients.worker import Worker

SPEC = clusters.Spec("saga", replicas=1)
STEPS = 3


@dataclass(frozen=True)
class Sizes:
    """Sagas per measurement, and how many run at once (also the pool's size)."""

    sagas: int = 400
    in_flight: int = 16


QUICK = Sizes(sagas=24, in_flight=4)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _drive(count: int, in_flight: int,
                 one: Callable[[int], Awaitable[None]]) -> dict[str, float]:
    """Run ``one(i)`` for i < count, ``in_flight`` at a time: rate and latencies."""
    latencies: list[float] = []
    queue = iter(range(count))

    async def lane() -> None:
        for i in queue:
            started = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    elapsed = time.perf_counter() - began
    return {"per_s": count / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * _percentile(latencies, 0.99)}


async def _sagas(etcd: str, sizes: Sizes) -> dict[str, float]:
    run = uuid.uuid4().hex[:6]
    kind = SagaType(f"bench-{run}", queue=f"bench-saga-{run}")
    for n in range(STEPS):
        async def step(ctx: StepContext) -> None:
            return None
        kind.step(f"s{n}")(step)
    async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=30) as mesh:
        await mesh.sagas.register(kind)
        async with mesh.sagas.worker(kind, concurrency=sizes.in_flight, poll=1):
            async def one(i: int) -> None:
                saga_id = f"{run}-{i}"
                await mesh.sagas.start(kind, saga_id)
                done = await mesh.sagas.result(saga_id, timeout=60)
                assert done.state == "COMPLETED", done

            warm = max(2, sizes.in_flight)
            await _drive(warm, sizes.in_flight, lambda i: one(-1 - i))
            return await _drive(sizes.sagas, sizes.in_flight, one)


async def _chains(etcd: str, sizes: Sizes) -> dict[str, float]:
    run = uuid.uuid4().hex[:6]
    queue = f"bench-chain-{run}"
    finished: dict[str, asyncio.Future[None]] = {}
    async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=30) as mesh:
        def handler(n: int) -> Callable[[JobContext], Awaitable[None]]:
            async def run_step(job: JobContext) -> None:
                chain = job.payload.decode()
                if n + 1 < STEPS:
                    await mesh.scheduler.enqueue(queue, f"c{n + 1}", chain)
                else:
                    future = finished.get(chain)
                    if future is not None and not future.done():
                        future.set_result(None)
            return run_step

        handlers: dict[str, Any] = {f"c{n}": handler(n) for n in range(STEPS)}
        async with Worker(mesh, queue, handlers, concurrency=sizes.in_flight, poll=1):
            async def one(i: int) -> None:
                chain = f"{run}-{i}"
                done = finished[chain] = asyncio.get_running_loop().create_future()
                try:
                    await mesh.scheduler.enqueue(queue, "c0", chain)
                    await asyncio.wait_for(done, 60)
                finally:
                    del finished[chain]

            await _drive(max(2, sizes.in_flight), sizes.in_flight, lambda i: one(-1 - i))
            return await _drive(sizes.sagas, sizes.in_flight, one)


def run(workdir: Path, etcd: str, sizes: Sizes) -> dict[str, Any]:
    """Sagas, then the hand-made chains, on one cluster."""
    import contextlib

    with contextlib.ExitStack() as stack:
        clusters.start_one(stack, workdir, etcd, SPEC)
        sagas = aio.run(_sagas(etcd, sizes))
        chains = aio.run(_chains(etcd, sizes))
    ratio = sagas["per_s"] / chains["per_s"] if chains["per_s"] else 0.0
    print(f"[saga] {STEPS}-step sagas {sagas['per_s']:,.1f}/s (p50 {sagas['p50_ms']:.0f} ms), "
          f"hand-chained jobs {chains['per_s']:,.1f}/s (p50 {chains['p50_ms']:.0f} ms): "
          f"{ratio:.2f}x", file=sys.stderr, flush=True)
    return {"setup": f"3 nodes, R=1; {STEPS} no-op steps; {sizes.sagas} sagas (chains), "
                     f"{sizes.in_flight} in flight, a worker pool of {sizes.in_flight} in the "
                     "benchmark's process",
            "sagas": sagas, "chains": chains, "ratio": ratio}


def main() -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.saga", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    with clusters.scratch_etcd("mesh-saga-") as (tmp, etcd):
        print(json.dumps(run(tmp, etcd, QUICK if args.quick else Sizes()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
