"""Lock throughput: acquire+release cycles/s, Mesh's LockService against etcd's lock.

Two 3-node clusters, R=1 (as the replicated Set rows) and R=0 (unreplicated),
run on the cluster rows' etcd; the baseline is etcd's own lock through aetcd
(``client.lock(key, ttl=...)``: a fresh lease and a create-if-absent Txn to
acquire, a compare-and-delete Txn to release) against that same etcd. Each
workload loops acquire -> release, either on one lock (``seq``) or in 16 tasks
on 16 distinct locks (``c16``), so no cycle ever waits for another. Workloads
are interleaved in rounds (etcd, Mesh R=1, Mesh R=0, then again), like the
other rows, so drift on the machine hits every side alike. With them runs the
floor of a replicated cycle (``bench.floor``): two raw gRPC calls, each relayed
to a peer and acknowledged, with nothing of Mesh behind them.

The sequential cycle is also timed three more ways, so that its distance from
the floor splits into parts (``report.lock_seq_split``): through the generated
stubs over the typed client's session straight to the lock's primary
(``stub.lock.r1.seq``, ``stub.lock.r0.seq``: Mesh's nodes without the typed
client), and as two raw echoes, the floor's calls without their relay
(``floor.echo.seq``).

``python -m bench.locks`` runs only these rows (its own etcd) and prints their table.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aetcd
from google.protobuf import duration_pb2

from bench import aio, clusters, floor, replication_counts, report, standalone
from bench.timing import Measurement, Op, Workload, interleaved
from clients import Mesh
from common.etcd import client_for
from mesh.lock.v1 import lock_pb2 as pb
from mesh.lock.v1 import lock_pb2_grpc as pb_grpc

TTL = 10.0
"""Lease ttl of every acquire, seconds (aetcd takes whole seconds)."""
WAIT = 5.0
"""How long an acquire may wait; locks are never contended, so it never does."""
CONCURRENCY = (1, 16)
SPECS = {
    "r1": clusters.Spec("lock-r1", replicas=1, replication="sync"),
    "r0": clusters.Spec("lock-r0", replicas=0),
}
"""Mesh variant -> its cluster (same shape as the replicated Set rows)."""
TITLES = {"r1": "3 nodes, R=1", "r0": "3 nodes, R=0 (unreplicated)"}
ETCD_PREFIX = "bench-lock/"
"""etcd key prefix of the baseline's locks (apart from every cluster's keys)."""


def workload_name(side: str, in_flight: int) -> str:
    """``etcd.lock.seq``, ``floor.lock.seq``, ``cluster.lock.r1.c16``, ..."""
    shape = "seq" if in_flight == 1 else f"c{in_flight}"
    if side in ("etcd", "floor"):
        return f"{side}.lock.{shape}"
    return f"cluster.lock.{side}.{shape}"


def stub_name(variant: str) -> str:
    """``stub.lock.r1.seq``: the sequential cycle through the generated stubs."""
    return f"stub.lock.{variant}.seq"


FLOOR_ECHO = "floor.echo.seq"
"""Two raw echoes in sequence: the floor's cycle without its relay."""


def _locks(in_flight: int) -> str:
    return "1 lock, 1 loop" if in_flight == 1 else f"{in_flight} locks, {in_flight} loops"


@dataclass(frozen=True)
class Clients:
    """One typed client per Mesh variant, one aetcd client and the floor's relays,
    all connected."""

    meshes: dict[str, Mesh]
    etcd: aetcd.Client
    relays: floor.Relays


def _cycles(names: list[str], cycle: Callable[[str], Awaitable[None]]) -> Op:
    """An op running ``cycle`` on a free name from ``names`` (one name per worker).

    Each call takes a name off the pool and puts it back when done, so two calls
    never share a lock; as the pool is a stack, a worker keeps reusing its own name.
    """
    async def op() -> None:
        name = names.pop()
        try:
            await cycle(name)
        finally:
            names.append(name)
    return op


def _mesh_cycle(mesh: Mesh) -> Callable[[str], Awaitable[None]]:
    async def cycle(name: str) -> None:
        lease = await mesh.locks.acquire(name, ttl=TTL, wait=WAIT)
        await lease.release()
    return cycle


def _stub_cycle(mesh: Mesh, name: str) -> Op:
    """Acquire and release ``name`` through the generated stub, over the session
    and with the metadata the typed client uses, at the primary it routes to: the
    requests the typed client sends, as it sends them, without its coalescing,
    retries, breaker or lease bookkeeping."""
    stub = mesh.stub(pb_grpc.LockServiceStub, mesh.route("lock", name).address)
    metadata = mesh.call_metadata()
    ttl = duration_pb2.Duration(seconds=int(TTL))
    wait = duration_pb2.Duration(seconds=int(WAIT))

    async def cycle() -> None:
        granted = await stub.Acquire(pb.AcquireRequest(
            name=name, owner="bench", ttl=ttl, permits=1, max_permits=1,
            request_id=uuid.uuid4().hex, wait_timeout=wait), timeout=TTL, metadata=metadata)
        await stub.Release(pb.ReleaseRequest(name=name, lease_id=granted.lease_id),
                           timeout=TTL, metadata=metadata)
    return cycle


def _etcd_cycle(client: aetcd.Client) -> Callable[[str], Awaitable[None]]:
    async def cycle(name: str) -> None:
        lock = client.lock(name.encode(), ttl=int(TTL))
        if not await lock.acquire(timeout=int(WAIT)):
            raise RuntimeError(f"etcd lock {name!r} not acquired within {WAIT:g}s")
        if not await lock.release():
            raise RuntimeError(f"etcd lock {name!r} was not held at release")
    return cycle


Counters = Callable[[], Awaitable[dict[str, float]]]


def workloads(c: Clients, counters: dict[str, Counters] | None = None) -> list[Workload]:
    """etcd then every Mesh variant, at each concurrency; ``counters``: the
    replication counters of each variant's cluster, read around its windows."""
    counters = counters or {}
    work = []
    for n in CONCURRENCY:
        names = [f"{ETCD_PREFIX}c{n}-{i}" for i in range(n)]
        work.append(Workload(
            workload_name("etcd", n),
            f"etcd lock (aetcd client.lock) acquire+release, {_locks(n)}",
            _cycles(names, _etcd_cycle(c.etcd)), n))
        for variant, mesh in c.meshes.items():
            names = [f"bench-lock:{variant}:c{n}-{i}" for i in range(n)]
            work.append(Workload(
                workload_name(variant, n),
                f"mesh.locks acquire+release, {TITLES[variant]}, {_locks(n)}",
                _cycles(names, _mesh_cycle(mesh)), n, counters=counters.get(variant)))
        work.append(Workload(
            workload_name("floor", n),
            f"two raw gRPC calls, each relayed to one of two peers and acknowledged (a replicated "
            f"acquire+release's messages, nothing of Mesh), {floor.SIZE} processes, "
            f"{_locks(n)}", c.relays.cycles(n), n))
    for variant, mesh in c.meshes.items():
        work.append(Workload(
            stub_name(variant),
            f"LockService Acquire+Release through the generated stub over the session, at "
            f"the lock's primary (no typed client), {TITLES[variant]}, 1 lock, 1 loop",
            _stub_cycle(mesh, f"bench-lock:{variant}:stub")))
    work.append(Workload(FLOOR_ECHO, "two raw gRPC calls (messages of one stream) answered "
                         "at once (the floor's cycle without its relay), 1 loop",
                         c.relays.echo_cycles()))
    return work


@contextlib.asynccontextmanager
async def connected(etcd: str, relays: list[str]) -> AsyncIterator[Clients]:
    """Connect every client and check that one cycle works on each side."""
    async with contextlib.AsyncExitStack() as stack:
        meshes = {variant: await stack.enter_async_context(Mesh(etcd=etcd, cluster=spec.name))
                  for variant, spec in SPECS.items()}
        client = await stack.enter_async_context(client_for([etcd]))
        for variant, mesh in meshes.items():  # routes known and channels open
            await _mesh_cycle(mesh)(f"bench-lock:{variant}:check")
        await _etcd_cycle(client)(f"{ETCD_PREFIX}check")
        relay = await stack.enter_async_context(floor.connected(relays))
        yield Clients(meshes, client, relay)


async def _measure(etcd: str, relays: list[str], warmup: float, window: float, rounds: int,
                   counters: dict[str, Counters]) -> list[Measurement]:
    async with connected(etcd, relays) as c:
        return await interleaved(workloads(c, counters), warmup, window, rounds, "cycles/s")


def run(workdir: Path, etcd: str, warmup: float, window: float, rounds: int
        ) -> list[Measurement]:
    """Start both clusters on ``etcd`` and the floor's relays, time every lock
    workload, stop them all.

    ``warmup`` and ``window`` are per workload over all ``rounds``.
    """
    with contextlib.ExitStack() as stack:
        started = clusters.start(stack, workdir, etcd, list(SPECS.values()))
        counters = {variant: replication_counts.reader(local)
                    for variant, local, spec in zip(SPECS, started, SPECS.values(), strict=True)
                    if spec.replicas}
        relays = floor.start_relays(stack, workdir, "lock-floor")
        return aio.run(_measure(etcd, relays, warmup / rounds, window / rounds, rounds,
                                counters))


def main(argv: list[str] | None = None) -> int:
    """Only the lock rows, on an etcd of their own: print their ratios."""
    return standalone.main("python -m bench.locks", __doc__.splitlines()[0], run,
                           report.lock_markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
