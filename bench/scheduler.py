"""Job scheduler throughput: enqueues/s and end-to-end jobs/s on a durable 3-node
cluster, against Celery with a Redis broker on this machine, in the same rounds.

Mesh: 3 nodes, R=1, on the cluster rows' etcd. The scheduler replicates
synchronously and durably, as the event store does: an Enqueue or a Complete is
answered once the primary and its replica both have it on disk. Enqueues go
straight to the queue's primary, found in the cluster map, through the raw
generated stub (``x-mesh-route: client``): the client library's costs are not
in them.

Celery (``bench.celery_app``): a Redis broker on a redis-server started for
these rows (in memory, no persistence: Redis as a Celery broker usually runs,
and cheaper than fsyncing every write on two nodes), ``task_acks_late`` (a task
is acknowledged after it ran, at-least-once as a Mesh lease is), no result
backend. Publishing is synchronous, so Celery's producers are threads (in this
process, with the event loop idle), where Mesh's are asyncio tasks: each side
with its usual client model, at the same number of calls in flight. Jobs carry
100 bytes on both sides (a payload; a string argument).

- ``enqueue.seq`` / ``enqueue.c16``: Enqueue / ``apply_async`` of a no-op job to
  a queue no worker reads, 1 or 16 in flight; rated in enqueues/s.
- ``enqueue.client.c16`` (Mesh only, against Celery's ``enqueue.c16``): the same
  16 enqueues in flight through the typed client (``mesh.scheduler.enqueue``),
  which sends the enqueues made while a node is busy as one EnqueueBatch
  (``clients.coalesce``), as apply_async is Celery's client.
- ``enqueue.batch100.c16`` (Mesh only, against Celery's ``enqueue.c16``):
  EnqueueBatch of 100 such jobs per call, 16 calls in flight; rated in jobs/s.
  Celery has no batch publish: its row is its best, apply_async from 16 threads.
- ``e2e.c16``: end to end. 16 producers enqueue K jobs as fast as they can while
  the side's worker, a process of its own, claims, runs and completes them; the
  time is from the first enqueue until every job has run and is finished on the
  broker (Mesh: ``Stats.succeeded_total`` has counted them all; Celery: the
  queue and the unacked hash are empty), rated in jobs/s (K / time). Mesh's
  worker is ``clients.worker.Worker`` with concurrency 16 (batch claims of up
  to 16, as many as it has free slots; ``bench.mesh_worker``), Celery's is
  ``celery worker --pool threads --concurrency 16`` (prefetch 4 per thread,
  Celery's default). Each handler only bumps a counter in shared memory
  (``bench.counter``), which the benchmark polls every few milliseconds. K is
  sized for each side from its rate in the previous drain, so a drain lasts
  about one round's window (warmup or measured) on both sides. Mesh's worker
  completes each job with a Complete that also leases the slot's next job (the
  pool's default). Two more Mesh rows, against the same Celery row:
  ``e2e.nochain.c16``, the pool without that (a Complete, then Claims for the
  freed slots: the path before ``ClaimNext``), on a queue and worker process of
  its own; ``e2e.batch.c16``, the default pool with producers that send
  EnqueueBatch calls of up to 100 jobs instead of single Enqueues; and
  ``e2e.client.c16``, the default pool with producers that call the typed
  client's ``enqueue`` one job at a time (coalesced, as above).

``python -m bench.scheduler`` runs only these rows (its own etcd) and prints their table.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import redis.asyncio as aioredis

from bench import aio, clusters, counter, mesh_worker, report, services, standalone
from bench.celery_app import BROKER_ENV, COUNTERS_ENV, app, noop
from bench.progress import Progress
from bench.timing import Measurement, Op, Workload, combine, measure
from clients import Mesh
from common.localmesh import Child
from common.slots import slot_for
from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

SPEC = clusters.Spec("scheduler-r1", replicas=1, replication="sync")
CONCURRENCY = 16
"""Enqueues in flight in the c16 rows; producers in the end-to-end rows."""
WORKER_CONCURRENCY = 16
"""Jobs each side's worker runs at once."""
CELERY_POOL = "threads"
"""The Celery worker's pool: one process running jobs in threads, as Mesh's worker runs
them as tasks (prefork with 2 or 16 processes, and solo, were within this VM's noise
of it for no-op tasks: 350-460 jobs/s end to end)."""
JOB_TYPE = mesh_worker.JOB_TYPE
PAYLOAD = b"j" * 100
ARGUMENT = "j" * 100
ENQUEUE_QUEUE = "bench-enqueue"
"""The enqueue rows' queue, which no worker reads (on both sides)."""
E2E_QUEUE = "bench-e2e"
"""The end-to-end rows' queue, which each side's worker drains."""
NOCHAIN_QUEUE = "bench-e2e-nochain"
"""The queue of Mesh's worker that does not chain (``e2e.nochain.c16``)."""
BATCH = 100
"""Jobs per EnqueueBatch in the batch rows."""
UNACKED = "unacked"
"""Kombu's Redis hash of delivered, unacknowledged messages."""
POLL = 0.005
"""Seconds between looks at the counters (and, at the end, the brokers)."""
PROBE_JOBS = 50
"""Jobs of the first drain, which checks the pipeline and gives the first rate."""
MIN_JOBS, MAX_JOBS = 50, 200_000
"""Bounds on the jobs of one drain."""
READY_TIMEOUT = 30.0
"""How long setup retries an Enqueue whose group is not serving yet."""


def workload_name(side: str, row: str) -> str:
    """``celery.scheduler.enqueue.seq``, ``cluster.scheduler.e2e.c16``, ..."""
    return f"{side}.scheduler.{row}"


async def _spent() -> None:
    raise RuntimeError("this row is timed by its own loop, not bench.timing.measure")


Measure = Callable[[Workload, float, float, Progress], Awaitable[Measurement]]


@dataclass(frozen=True)
class Row:
    """A workload, the unit of its progress line, and how one round of it is timed."""

    workload: Workload
    unit: str
    measure: Measure = measure


class Queues:
    """Stubs bound to each queue's primary (from the cluster map), and the call
    metadata that makes nodes refuse rather than forward."""

    def __init__(self, mesh: Mesh) -> None:
        if mesh.table is None:
            raise RuntimeError(f"{SPEC.name}: the client has no cluster map")
        self.mesh, self.table = mesh, mesh.table
        self.metadata = mesh.call_metadata()
        self.timeout = mesh.timeout

    def stub(self, queue: str) -> pb_grpc.SchedulerServiceStub:
        group = self.table.group_of_slot(slot_for(queue))
        if group is None or not group.primary:
            raise RuntimeError(f"{SPEC.name}: no primary for queue {queue!r}")
        return self.mesh.stub(pb_grpc.SchedulerServiceStub,
                              self.table.addresses[group.primary])

    def enqueue(self, queue: str) -> Op:
        """An op enqueueing one no-op job to ``queue``."""
        stub = self.stub(queue)
        request = pb.EnqueueRequest(queue=queue, type=JOB_TYPE, payload=PAYLOAD)
        return lambda: stub.Enqueue(request, timeout=self.timeout, metadata=self.metadata)

    def client_enqueue(self, queue: str) -> Op:
        """An op enqueueing one no-op job to ``queue`` through the typed client."""
        enqueue = self.mesh.scheduler.enqueue
        return lambda: enqueue(queue, JOB_TYPE, PAYLOAD)

    def enqueue_batch(self, queue: str, jobs: int) -> Op:
        """An op enqueueing ``jobs`` no-op jobs to ``queue`` in one EnqueueBatch."""
        stub = self.stub(queue)
        request = pb.EnqueueBatchRequest(jobs=[
            pb.EnqueueRequest(queue=queue, type=JOB_TYPE, payload=PAYLOAD)] * jobs)

        async def op() -> None:
            reply = await stub.EnqueueBatch(request, timeout=self.timeout,
                                            metadata=self.metadata)
            refused = [r.error for r in reply.results if r.HasField("error")]
            if refused:
                raise RuntimeError(f"{SPEC.name}: EnqueueBatch refused {len(refused)} "
                                   f"jobs: {refused[0].reason} {refused[0].message}")
        return op

    async def succeeded(self, queue: str) -> int:
        stats = await self.stub(queue).Stats(pb.StatsRequest(queue=queue), timeout=self.timeout,
                                             metadata=self.metadata)
        return int(stats.succeeded_total)


def celery_send(queue: str) -> Callable[[], object]:
    """One ``apply_async`` of the no-op task to ``queue`` (blocking)."""
    return lambda: noop.apply_async((ARGUMENT,), queue=queue)


# -- timing threads (Celery's producers) ------------------------------------------

class _Threads:
    """``count`` threads calling ``body(i)``; the first failure is kept."""

    def __init__(self, count: int, body: Callable[[int], None]) -> None:
        self.failure: BaseException | None = None

        def run(i: int) -> None:
            try:
                body(i)
            except BaseException as exc:
                if self.failure is None:
                    self.failure = exc

        self.threads = [threading.Thread(target=run, args=(i,), daemon=True,
                                         name=f"bench-producer-{i}") for i in range(count)]
        for t in self.threads:
            t.start()

    def check(self) -> None:
        if self.failure is not None:
            raise RuntimeError("a producer thread failed") from self.failure

    async def join(self) -> None:
        def join_all() -> None:
            for t in self.threads:
                t.join()
        await asyncio.to_thread(join_all)
        self.check()


def threaded(send: Callable[[], object]) -> Measure:
    """``bench.timing.measure`` for a blocking call: ``workload.concurrency`` threads
    repeat ``send`` through a warmup and a window; the window counts completions."""
    async def run(workload: Workload, warmup: float, window: float,
                  progress: Progress) -> Measurement:
        counts = [0] * workload.concurrency
        stop = threading.Event()

        def body(i: int) -> None:
            while not stop.is_set():
                send()
                counts[i] += 1

        progress.start(workload.name)
        start = time.perf_counter()
        threads = _Threads(workload.concurrency, body)
        try:
            await _ticking(threads.check, start + warmup, start, warmup + window, progress)
            first, t0 = sum(counts), time.perf_counter()
            await _ticking(threads.check, t0 + window, start, warmup + window, progress)
            last, t1 = sum(counts), time.perf_counter()
        finally:
            stop.set()  # the calls in flight finish; they are not counted
            await threads.join()
        return Measurement(workload, last - first, t1 - t0)
    return run


async def _ticking(check: Callable[[], None], until: float, start: float, total: float,
                   progress: Progress) -> None:
    while (remaining := until - time.perf_counter()) > 0:
        await asyncio.sleep(min(0.1, remaining))
        check()
        progress.tick(time.perf_counter() - start, total)


# -- end to end ----------------------------------------------------------------------

class Pipeline(Protocol):
    """One side of the end-to-end rows: its producers, its worker's count, its broker."""

    name: str

    async def produce(self, jobs: int) -> None:
        """Enqueue ``jobs`` no-op jobs with ``CONCURRENCY`` producers."""

    def ran(self) -> int:
        """Jobs the worker has run so far."""

    async def mark(self) -> int:
        """Where the broker stands before a drain (what ``settled`` compares with)."""

    async def settled(self, mark: int, jobs: int) -> bool:
        """Whether the broker has finished every job of the drain that started at ``mark``."""


def _shares(jobs: int) -> list[int]:
    """``jobs`` split over the producers."""
    return [jobs // CONCURRENCY + (i < jobs % CONCURRENCY) for i in range(CONCURRENCY)]


class MeshPipeline:
    """Raw stub Enqueue (or EnqueueBatch of up to ``batch`` jobs, or the typed
    client's enqueue) in asyncio tasks -> ``bench.mesh_worker`` -> Complete."""

    name = "mesh"

    def __init__(self, queues: Queues, counters: Path, queue: str = E2E_QUEUE,
                 batch: int = 0, client: bool = False) -> None:
        self.queues, self.counters, self.queue = queues, counter.Total(counters), queue
        self.batch = batch
        self.enqueue = queues.client_enqueue(queue) if client else queues.enqueue(queue)
        self.batches = {n: queues.enqueue_batch(queue, n) for n in range(1, batch + 1)}

    async def produce(self, jobs: int) -> None:
        async def producer(n: int) -> None:
            if self.batch:
                for start in range(0, n, self.batch):
                    await self.batches[min(self.batch, n - start)]()
                return
            for _ in range(n):
                await self.enqueue()
        await asyncio.gather(*(producer(n) for n in _shares(jobs)))

    def ran(self) -> int:
        return self.counters.value

    async def mark(self) -> int:
        return await self.queues.succeeded(self.queue)

    async def settled(self, mark: int, jobs: int) -> bool:
        return await self.queues.succeeded(self.queue) >= mark + jobs


class CeleryPipeline:
    """``apply_async`` in threads -> the Celery worker -> ack."""

    name = "celery"

    def __init__(self, broker: aioredis.Redis, counters: Path) -> None:
        self.broker, self.counters = broker, counter.Total(counters)
        self.send = celery_send(E2E_QUEUE)

    async def produce(self, jobs: int) -> None:
        shares = _shares(jobs)

        def body(i: int) -> None:
            for _ in range(shares[i]):
                self.send()
        await _Threads(CONCURRENCY, body).join()

    def ran(self) -> int:
        return self.counters.value

    async def mark(self) -> int:
        return 0

    async def settled(self, mark: int, jobs: int) -> bool:
        del mark, jobs  # the e2e queue is only ever filled by a drain
        async with self.broker.pipeline(transaction=False) as pipe:
            pipe.llen(E2E_QUEUE)
            pipe.hlen(UNACKED)
            waiting, unacked = await pipe.execute()
        return bool(waiting == 0 and unacked == 0)


@dataclass
class Drains:
    """The end-to-end rows of one side: drains sized from the side's latest rate."""

    pipeline: Pipeline
    rate: float = 0.0
    """Jobs/s of the latest drain (0 before the probe)."""

    async def drain(self, jobs: int, tick: Callable[[], None] = lambda: None) -> float:
        """Enqueue ``jobs`` and wait until every one is finished; returns the seconds."""
        p = self.pipeline
        ran, mark = p.ran(), await p.mark()
        # Generous: a drain is sized to last about one window at the latest rate.
        limit = max(30.0, 20 * jobs / self.rate) if self.rate else 60.0
        start = time.perf_counter()
        producers = asyncio.create_task(p.produce(jobs))
        try:
            while p.ran() < ran + jobs or not await p.settled(mark, jobs):
                if producers.done() and producers.exception() is not None:
                    await producers  # raises
                elapsed = time.perf_counter() - start
                if elapsed > limit:
                    raise RuntimeError(f"{p.name}: {p.ran() - ran} of {jobs} jobs ran "
                                       f"in {elapsed:.1f} s")
                tick()
                await asyncio.sleep(POLL)
            await producers
        finally:
            producers.cancel()
            await asyncio.gather(producers, return_exceptions=True)
        seconds = time.perf_counter() - start
        self.rate = jobs / seconds
        return seconds

    def size(self, seconds: float) -> int:
        return max(MIN_JOBS, min(MAX_JOBS, round(self.rate * seconds)))

    async def measure(self, workload: Workload, warmup: float, window: float,
                      progress: Progress) -> Measurement:
        progress.start(workload.name)
        begun = time.perf_counter()

        def tick() -> None:
            progress.tick(time.perf_counter() - begun, warmup + window)

        if warmup > 0:
            await self.drain(self.size(warmup), tick)
        jobs = self.size(window)
        return Measurement(workload, jobs, await self.drain(jobs, tick))


# -- the rows ------------------------------------------------------------------------

@dataclass(frozen=True)
class E2E:
    """Each end-to-end row's drains: Celery's, and Mesh's three ways."""

    celery: Drains
    mesh: Drains
    """Single Enqueues -> the pool, whose Completes lease the next jobs."""
    nochain: Drains
    """Single Enqueues -> a pool that completes, then claims."""
    batch: Drains
    """EnqueueBatch calls -> the pool, as ``mesh``."""
    client: Drains
    """The typed client's enqueues (coalesced) -> the pool, as ``mesh``."""


def rows(queues: Queues, e2e: E2E) -> list[Row]:
    """Every row, in run order: each Celery row, then the Mesh rows it is the baseline of."""
    mesh_setup = "3 nodes R=1 durable"
    work = []
    for n in (1, CONCURRENCY):
        shape = "seq" if n == 1 else f"c{n}"
        work += [
            Row(Workload(workload_name("celery", f"enqueue.{shape}"),
                         f"Celery apply_async of a no-op task -> Redis broker, "
                         f"{'1 thread' if n == 1 else f'{n} threads'}", _spent, n),
                "enqueues/s", threaded(celery_send(ENQUEUE_QUEUE))),
            Row(Workload(workload_name("cluster", f"enqueue.{shape}"),
                         f"raw stub Enqueue of a no-op job -> primary, {mesh_setup}, "
                         f"{n} in flight", queues.enqueue(ENQUEUE_QUEUE), n), "enqueues/s"),
        ]
    work.append(Row(Workload(
        workload_name("cluster", f"enqueue.client.c{CONCURRENCY}"),
        f"mesh.scheduler.enqueue of a no-op job (coalesced into EnqueueBatch), {mesh_setup}, "
        f"{CONCURRENCY} in flight", queues.client_enqueue(ENQUEUE_QUEUE), CONCURRENCY),
        "enqueues/s"))
    work.append(Row(Workload(
        workload_name("cluster", f"enqueue.batch{BATCH}.c{CONCURRENCY}"),
        f"raw stub EnqueueBatch of {BATCH} no-op jobs -> primary, {mesh_setup}, "
        f"{CONCURRENCY} in flight", queues.enqueue_batch(ENQUEUE_QUEUE, BATCH), CONCURRENCY,
        BATCH), "jobs/s"))
    workers = f"{WORKER_CONCURRENCY} at once, in a process of its own"
    pool = f"clients.worker.Worker ({workers}, batch claims)"
    work += [
        Row(Workload(workload_name("celery", f"e2e.c{CONCURRENCY}"),
                     f"apply_async by {CONCURRENCY} threads -> celery worker ({CELERY_POOL} "
                     f"pool, {workers}, acks_late) -> acked; Redis broker", _spent,
                     CONCURRENCY), "jobs/s", e2e.celery.measure),
        Row(Workload(workload_name("cluster", f"e2e.c{CONCURRENCY}"),
                     f"raw stub Enqueue by {CONCURRENCY} tasks -> {pool} -> Complete that "
                     f"leases the slot's next job; {mesh_setup}", _spent,
                     CONCURRENCY), "jobs/s", e2e.mesh.measure),
        Row(Workload(workload_name("cluster", f"e2e.nochain.c{CONCURRENCY}"),
                     f"raw stub Enqueue by {CONCURRENCY} tasks -> {pool}, chain=False -> "
                     f"Complete, then Claims; {mesh_setup}", _spent,
                     CONCURRENCY), "jobs/s", e2e.nochain.measure),
        Row(Workload(workload_name("cluster", f"e2e.batch.c{CONCURRENCY}"),
                     f"raw stub EnqueueBatch of up to {BATCH} jobs by {CONCURRENCY} tasks -> "
                     f"{pool} -> Complete that leases the slot's next job; {mesh_setup}",
                     _spent, CONCURRENCY), "jobs/s", e2e.batch.measure),
        Row(Workload(workload_name("cluster", f"e2e.client.c{CONCURRENCY}"),
                     f"mesh.scheduler.enqueue (coalesced) by {CONCURRENCY} tasks -> {pool} -> "
                     f"Complete that leases the slot's next job; {mesh_setup}",
                     _spent, CONCURRENCY), "jobs/s", e2e.client.measure),
    ]
    return work


async def interleaved(work: list[Row], warmup: float, window: float, rounds: int
                      ) -> list[Measurement]:
    """Every row in ``rounds`` interleaved rounds; ``warmup`` and ``window`` per round."""
    progress = Progress(len(work) * rounds)
    parts: dict[str, list[Measurement]] = {r.workload.name: [] for r in work}
    for _ in range(rounds):
        for row in work:
            m = await row.measure(row.workload, warmup, window, progress)
            progress.finish(f"{m.keys_per_s:,.0f} {row.unit}")
            parts[row.workload.name].append(m)
    return [combine(p) for p in parts.values()]


async def _enqueue_ready(queues: Queues, queue: str) -> None:
    """Enqueue one job, retrying while the queue's group is not serving yet."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            await queues.enqueue(queue)()
            return
        except grpc.aio.AioRpcError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{SPEC.name}: Enqueue to {queue!r} still fails after "
                                   f"{READY_TIMEOUT:g} s: {exc.code().name} "
                                   f"{exc.details()}") from exc
            await asyncio.sleep(0.1)


@dataclass(frozen=True)
class Setup:
    """Where the rows' servers are: etcd, the Redis broker, the counter directories,
    and how to start the Mesh worker (once the cluster serves)."""

    etcd: str
    redis_port: int
    mesh_counters: Path
    nochain_counters: Path
    celery_counters: Path
    start_mesh_worker: Callable[[], None]


async def _measure(s: Setup, warmup: float, window: float, rounds: int
                   ) -> list[Measurement]:
    async with (Mesh(etcd=s.etcd, cluster=SPEC.name) as mesh,
                aioredis.Redis(port=s.redis_port) as broker):
        queues = Queues(mesh)
        for queue in (ENQUEUE_QUEUE, E2E_QUEUE, NOCHAIN_QUEUE):
            await _enqueue_ready(queues, queue)
        s.start_mesh_worker()
        await asyncio.to_thread(celery_send(ENQUEUE_QUEUE))  # the broker takes a task
        e2e = E2E(celery=Drains(CeleryPipeline(broker, s.celery_counters)),
                  mesh=Drains(MeshPipeline(queues, s.mesh_counters)),
                  nochain=Drains(MeshPipeline(queues, s.nochain_counters, NOCHAIN_QUEUE)),
                  batch=Drains(MeshPipeline(queues, s.mesh_counters, batch=BATCH)),
                  client=Drains(MeshPipeline(queues, s.mesh_counters, client=True)))
        for drains in (e2e.mesh, e2e.nochain, e2e.batch, e2e.client, e2e.celery):
            await drains.drain(PROBE_JOBS)  # each worker runs jobs: the first rates
        return await interleaved(rows(queues, e2e), warmup, window, rounds)


def _python_child(name: str, argv: list[str], log: Path, env: dict[str, str]) -> Child:
    return Child(name, [sys.executable, *argv], log, env=services.python_env(**env))


def _logs_on_error(children: list[Child]) -> Callable[..., bool]:
    def report_logs(exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is not None and issubclass(exc_type, Exception):
            for child in children:
                print(f"===== {child.name} log =====\n{child.log_tail()}", file=sys.stderr)
        return False
    return report_logs


def run(workdir: Path, etcd: str, warmup: float, window: float, rounds: int
        ) -> list[Measurement]:
    """Start the cluster, redis-server and both workers, time every row, stop them all.

    ``warmup`` and ``window`` are per workload over all ``rounds``.
    """
    with contextlib.ExitStack() as stack:
        clusters.start(stack, workdir, etcd, [SPEC])
        base = workdir / "scheduler"
        base.mkdir()
        redis_port = services.start_redis(stack, base)
        broker = f"redis://127.0.0.1:{redis_port}/0"
        mesh_counters, celery_counters = base / "mesh-counters", base / "celery-counters"
        nochain_counters = base / "mesh-nochain-counters"
        for directory in (mesh_counters, nochain_counters, celery_counters):
            directory.mkdir()
        app.conf.broker_url = broker  # this process publishes too
        stack.callback(app.close)  # its pool of broker connections
        celery = _python_child("celery-worker", [
            "-m", "celery", "-A", "bench.celery_app", "worker", "--queues", E2E_QUEUE,
            "--pool", CELERY_POOL, "--concurrency", str(WORKER_CONCURRENCY),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "WARNING", "--hostname", "bench@%h"],
            base / "celery-worker.log",
            {BROKER_ENV: broker, COUNTERS_ENV: str(celery_counters)})
        def mesh_worker(name: str, queue: str, counters: Path, *extra: str) -> Child:
            return _python_child(name, [
                "-m", "bench.mesh_worker", "--etcd", etcd, "--cluster", SPEC.name,
                "--queue", queue, "--concurrency", str(WORKER_CONCURRENCY),
                "--counters", str(counters), *extra], base / f"{name}.log", {})

        workers = [mesh_worker("mesh-worker", E2E_QUEUE, mesh_counters),
                   mesh_worker("mesh-worker-nochain", NOCHAIN_QUEUE, nochain_counters,
                               "--no-chain")]
        stack.push(_logs_on_error([celery, *workers]))
        stack.callback(celery.stop)
        celery.start()  # it boots while the cluster's groups come up

        def start_mesh_worker() -> None:
            # From the event loop's thread, the main one: see clusters.start.
            for worker in workers:
                stack.callback(worker.stop)
                worker.start()
            for worker in workers:
                worker.wait_for_line("READY", 30.0)

        setup = Setup(etcd, redis_port, mesh_counters, nochain_counters, celery_counters,
                      start_mesh_worker)
        return aio.run(_measure(setup, warmup / rounds, window / rounds, rounds))


def environment() -> dict[str, Any]:
    """The rows' setup, for results.json."""
    return {
        "setup": f"Mesh: {SPEC.nodes} nodes, R={SPEC.replicas}, durable; Celery "
                 f"{standalone.version('celery')} (kombu {standalone.version('kombu')}) on a "
                 "Redis broker without persistence, acks_late, no result backend",
        "producers": CONCURRENCY,
        "worker_concurrency": WORKER_CONCURRENCY,
        "celery_pool": CELERY_POOL,
        "payload_bytes": len(PAYLOAD),
    }


def main(argv: list[str] | None = None) -> int:
    """Only the scheduler rows, on an etcd of their own: print their ratios."""
    return standalone.main("python -m bench.scheduler", __doc__.splitlines()[0], run,
                           report.scheduler_markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
