"""Replicated Set throughput: four 3-node clusters (R=0, R=1 sync, R=1 async, and R=1
sync with the internal plane open, to price peer authentication), one run; and
Get on the R=1 sync cluster, default against linearizable reads.

All three clusters run side by side on one etcd and their workloads are
interleaved in rounds, like the single-node rows, so drift on the machine hits
every variant alike. Each Set writes a key never written before. The replicated
Set workloads also count the replication messages their windows cost the
cluster's nodes and the commands those carried (``bench.replication_counts``).
At 64 in flight the floor of a replicated Set runs with them (``bench.floor``):
raw gRPC calls relayed to one of two peers against calls echoed at once, nothing of Mesh.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from bench import aio, clusters, floor, replication_counts
from bench.timing import Measurement, Op, Workload, interleaved
from clients import Mesh

Counters = Callable[[], Awaitable[dict[str, float]]]

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


GET_KEYS = [f"get:{i}" for i in range(100)]
"""Read by the Get rows (written once before timing)."""


def get_workload_name(linearizable: bool, in_flight: int) -> str:
    mode = "linearizable" if linearizable else "default"
    return f"cluster.get.r1sync.{mode}.{'seq' if in_flight == 1 else f'c{in_flight}'}"


def _get_op(mesh: Mesh, linearizable: bool) -> Op:
    keys = itertools.cycle(GET_KEYS)
    return lambda: mesh.cache.get(next(keys), linearizable=linearizable)


FLOOR_IN_FLIGHT = 64


def floor_workload_name(replicated: bool) -> str:
    return f"floor.set.{'replicated' if replicated else 'unreplicated'}.c{FLOOR_IN_FLIGHT}"


def workloads(meshes: dict[str, Mesh], relays: floor.Relays,
              counters: dict[str, Counters] | None = None) -> list[Workload]:
    """Every variant at every concurrency; the baseline first in each group. Then
    Get on the R=1 sync cluster, default reads and linearizable ones; then the
    floor's two rows on ``relays``. ``counters``: the replication counters of each
    variant's cluster, read around its Set windows."""
    counters = counters or {}
    sets = [
        Workload(workload_name(variant, n),
                 f"mesh.cache.set, 3 nodes {TITLES[variant]}, {n} in flight, new keys",
                 _set_op(mesh, variant, n), n, counters=counters.get(variant))
        for n in CONCURRENCY for variant, mesh in meshes.items()
    ]
    gets = [
        Workload(get_workload_name(linearizable, n),
                 f"mesh.cache.get{' (linearizable)' if linearizable else ''}, 3 nodes "
                 f"{TITLES['r1sync']}, {n} in flight", _get_op(meshes["r1sync"], linearizable),
                 n)
        for n in CONCURRENCY for linearizable in (False, True)
    ]
    floors = [
        Workload(floor_workload_name(False), f"raw gRPC calls (messages of one stream) "
                 f"answered at once (an "
                 f"unreplicated write's messages, nothing of Mesh), {floor.SIZE} processes, "
                 f"{FLOOR_IN_FLIGHT} in flight", relays.unreplicated(), FLOOR_IN_FLIGHT),
        Workload(floor_workload_name(True), f"raw gRPC calls (messages of one stream), "
                 f"each relayed to one of two peers and "
                 f"acknowledged (a replicated write's messages, nothing of Mesh), "
                 f"{floor.SIZE} processes, {FLOOR_IN_FLIGHT} in flight", relays.replicated(),
                 FLOOR_IN_FLIGHT),
    ]
    return sets + gets + floors


@contextlib.asynccontextmanager
async def _connected(etcd: str) -> AsyncIterator[dict[str, Mesh]]:
    async with contextlib.AsyncExitStack() as stack:
        meshes = {variant: await stack.enter_async_context(Mesh(etcd=etcd, cluster=spec.name))
                  for variant, spec in SPECS.items()}
        for variant, mesh in meshes.items():  # routes known and channels open
            await mesh.cache.set(f"set:{variant}:check", VALUE)
            if await mesh.cache.get(f"set:{variant}:check") != VALUE:
                raise RuntimeError(f"data check failed on the {variant} cluster")
        await meshes["r1sync"].cache.mset(dict.fromkeys(GET_KEYS, VALUE))
        yield meshes


async def _measure(etcd: str, relays: list[str], warmup: float, window: float, rounds: int,
                   counters: dict[str, Counters]) -> list[Measurement]:
    async with _connected(etcd) as meshes, floor.connected(relays) as relay:
        return await interleaved(workloads(meshes, relay, counters), warmup, window, rounds)


def run(workdir: Path, etcd: str, warmup: float, window: float, rounds: int
        ) -> list[Measurement]:
    """Start the clusters and the floor's relays, time every workload, stop them all."""
    with contextlib.ExitStack() as stack:
        started = clusters.start(stack, workdir, etcd, list(SPECS.values()))
        counters = {variant: replication_counts.reader(local)
                    for variant, local, spec in zip(SPECS, started, SPECS.values(), strict=True)
                    if spec.replicas}
        relays = floor.start_relays(stack, workdir, "set-floor")
        return aio.run(_measure(etcd, relays, warmup / rounds, window / rounds, rounds,
                                counters))
