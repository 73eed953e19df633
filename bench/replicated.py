"""Replicated Set throughput: four 3-node clusters (R=0, R=1 sync, R=1 async, and R=1
sync with the internal plane open, to price peer authentication), one run.

All three clusters run side by side on one etcd and their workloads are
interleaved in rounds, like the single-node rows, so drift on the machine hits
every variant alike. Each Set writes a key never written before.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

from bench import aio, clusters
from bench.timing import Measurement, Op, Workload, interleaved
from clients import Mesh

VALUE = b"s" * 100
CONCURRENCY = (1, 64)
SPECS = {
    "r0": clusters.Spec("set-r0", replicas=0),
    "r1sync": clusters.Spec("set-r1-sync", replicas=1, replication="sync"),
    "r1async": clusters.Spec("set-r1-async", replicas=1, replication="async"),
    "r1open": clusters.Spec("set-r1-open", replicas=1, replication="sync", secure_peers=False),
}
"""Variant name -> its cluster; R=0 (unreplicated) is the baseline of the replication
ratios, R=1 sync with an open internal plane that of peer authentication's."""

TITLES = {"r0": "R=0 (unreplicated)", "r1sync": "R=1 sync", "r1async": "R=1 async",
          "r1open": "R=1 sync, internal plane open (no cluster secret)"}


def workload_name(variant: str, in_flight: int) -> str:
    return f"cluster.set.{variant}.{'seq' if in_flight == 1 else f'c{in_flight}'}"


def _set_op(mesh: Mesh, variant: str, in_flight: int) -> Op:
    keys = (f"set:{variant}:{in_flight}:{i}" for i in itertools.count())
    return lambda: mesh.cache.set(next(keys), VALUE)


def workloads(meshes: dict[str, Mesh]) -> list[Workload]:
    """Every variant at every concurrency; the baseline first in each group."""
    return [
        Workload(workload_name(variant, n),
                 f"mesh.cache.set, 3 nodes {TITLES[variant]}, {n} in flight, new keys",
                 _set_op(mesh, variant, n), n)
        for n in CONCURRENCY for variant, mesh in meshes.items()
    ]


@contextlib.asynccontextmanager
async def _connected(etcd: str) -> AsyncIterator[dict[str, Mesh]]:
    async with contextlib.AsyncExitStack() as stack:
        meshes = {variant: await stack.enter_async_context(Mesh(etcd=etcd, cluster=spec.name))
                  for variant, spec in SPECS.items()}
        for variant, mesh in meshes.items():  # routes known and channels open
            await mesh.cache.set(f"set:{variant}:check", VALUE)
            if await mesh.cache.get(f"set:{variant}:check") != VALUE:
                raise RuntimeError(f"data check failed on the {variant} cluster")
        yield meshes


async def _measure(etcd: str, warmup: float, window: float, rounds: int
                   ) -> list[Measurement]:
    async with _connected(etcd) as meshes:
        return await interleaved(workloads(meshes), warmup, window, rounds)


def run(workdir: Path, etcd: str, warmup: float, window: float, rounds: int
        ) -> list[Measurement]:
    """Start the three clusters, time every Set workload, stop the clusters."""
    with contextlib.ExitStack() as stack:
        clusters.start(stack, workdir, etcd, list(SPECS.values()))
        return aio.run(_measure(etcd, warmup / rounds, window / rounds, rounds))
