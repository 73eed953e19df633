"""Where a workload spends its CPU: py-spy on the nodes and the client.

``python -m bench.cpu_profile [lock|set|append ...]`` starts a workload's R=1
cluster (3 nodes, as its bench rows) on an etcd of its own, runs the rows'
loops in two phases (one loop, then many in parallel) and samples every node
and the bench process itself with py-spy while they run (py-spy reads another
process's memory: it needs root or ptrace rights). The workloads:

- ``lock``: acquire+release cycles (``bench.locks``), 1 and 16 locks;
- ``set``: cache Sets of new keys, R=1 sync (``bench.replicated``), 1 and 64 in flight;
- ``append``: event appends of one event through the typed client on 16 streams
  (``bench.events``), 1 and 16 in flight;
- ``enqueue``: job enqueues of 100 bytes through the typed client into one queue
  no worker reads (``bench.scheduler``), 1 and 16 in flight;
- ``e2e``: the same enqueues, 16 in flight, into a queue a worker pool of 16
  (``bench.mesh_worker``, a process of its own, profiled too) claims, runs and
  completes, as ``bench.scheduler``'s end-to-end rows.

It writes, per phase, the share of samples each function spends on CPU itself
(self) and under it (cumulative), the nodes summed, to
``bench/profiles/<workload>-node.txt``, the client's to ``<workload>-client.txt``
and a worker's to ``<workload>-worker.txt``, with each process's CPU per
operation (user + system, from /proc) and, for the replicated workloads,
replication messages and commands per operation. Samples count only the thread holding the GIL
(py-spy ``--gil``), so the shares say where the Python CPU goes, not where
calls wait; time in C extensions (gRPC's Cython core, protobuf's upb) is
charged to the Python function that called them: for gRPC's callbacks the
loop's (``Runner.run`` on uvloop, whose loop is compiled, asyncio's
``Handle._run`` on asyncio's loop), and ``_StreamRequestMixin._write`` for a
stream's writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import (
    aio,
    clusters,
    counter,
    events,
    locks,
    replicated,
    replication_counts,
    scheduler,
    services,
)
from bench.timing import Op
from clients import Mesh, NewEvent
from common.localmesh import Child

OUTPUT = Path(__file__).resolve().parent / "profiles"
RATE = 200
"""py-spy samples per second per process."""
TOP = 30
"""Functions listed per table."""


@dataclass
class Stacks:
    """Collapsed stacks (``frame;frame;... count``) of one or more processes."""

    counts: Counter[str]

    @classmethod
    def read(cls, paths: Sequence[Path]) -> Stacks:
        counts: Counter[str] = Counter()
        for path in paths:
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    counts[stack] += int(count)
        return cls(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def tables(self, top: int = TOP) -> list[str]:
        """Top ``top`` functions by self samples, then by cumulative samples."""
        own: Counter[str] = Counter()
        under: Counter[str] = Counter()
        for stack, count in self.counts.items():
            frames = [_short(frame) for frame in stack.split(";") if frame]
            if not frames:
                continue
            own[frames[-1]] += count
            for frame in set(frames):  # a recursive function counts once per sample
                under[frame] += count
        total = max(self.total, 1)
        lines = ["self (CPU in the function itself):", ""]
        lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
        lines += ["", "cumulative (CPU in the function and what it calls):", ""]
        lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in under.most_common(top)]
        return lines


def _short(frame: str) -> str:
    """``fn (path/to/site-packages/pkg/mod.py)`` -> ``fn (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "lib/python3.", str(Path.cwd()) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "lib/python3.":
                where = "stdlib/" + where.split("/", 1)[-1]
    return f"{name} ({where})" if where else name


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", str(RATE), "--duration",
         str(max(1, round(seconds))), "--format", "raw", "--function", "--gil",
         "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)



Ops = Callable[[Mesh, int], Op]
"""ops(mesh, loop): the operation loop number ``loop`` repeats."""


def _lock_ops(mesh: Mesh, loop: int) -> Op:
    return locks._cycles([f"profile-lock:{loop}"], locks._mesh_cycle(mesh))


def _set_ops(mesh: Mesh, loop: int) -> Op:
    keys = (f"profile-set:{loop}:{i}" for i in itertools.count())
    return lambda: mesh.cache.set(next(keys), replicated.VALUE)


def _append_ops(mesh: Mesh, loop: int) -> Op:
    stream, ids = f"profile-append-{loop}", itertools.count(1)
    return lambda: mesh.events.append(stream, NewEvent(events.TYPE, events.DATA,
                                                       id=f"p{next(ids)}"))


def _enqueue_ops(mesh: Mesh, loop: int) -> Op:
    return lambda: mesh.scheduler.enqueue(scheduler.ENQUEUE_QUEUE, scheduler.JOB_TYPE,
                                          scheduler.PAYLOAD)


def _e2e_ops(mesh: Mesh, loop: int) -> Op:
    return lambda: mesh.scheduler.enqueue(scheduler.E2E_QUEUE, scheduler.JOB_TYPE,
                                          scheduler.PAYLOAD)


@dataclass(frozen=True)
class Target:
    """A workload to profile: its cluster, its operation, and its phases."""

    what: str
    unit: str
    spec: clusters.Spec
    ops: Ops
    phases: dict[str, int]
    """Phase name -> loops in parallel."""
    worker: str = ""
    """A queue a `bench.mesh_worker` pool works while the phases run (profiled as
    ``worker``), or none."""


TARGETS = {
    "lock": Target("mesh.locks acquire+release (as bench.locks)", "cycle",
                   locks.SPECS["r1"], _lock_ops, {"seq": 1, "c16": 16}),
    "set": Target("mesh.cache.set of new keys, R=1 sync (as bench.replicated)", "set",
                  replicated.SPECS["r1sync"], _set_ops, {"seq": 1, "c64": 64}),
    "append": Target("mesh.events.append of 1 event, one stream per loop, R=1 durable "
                     "(as bench.events)", "append", events.SPEC, _append_ops,
                     {"seq": 1, "c16": 16}),
    "enqueue": Target("mesh.scheduler.enqueue of a 100-byte job into one queue, R=1 "
                      "durable (as bench.scheduler)", "enqueue", scheduler.SPEC, _enqueue_ops,
                      {"seq": 1, "c16": 16}),
    "e2e": Target("mesh.scheduler.enqueue of a 100-byte job into one queue, R=1 durable, "
                  "worked by a pool of 16 in a process of its own (as bench.scheduler's "
                  "end-to-end rows)", "enqueue", scheduler.SPEC, _e2e_ops,
                  {"c16": scheduler.CONCURRENCY}, worker=scheduler.E2E_QUEUE),
}


@dataclass(frozen=True)
class Phase:
    """One phase's operations/s, each process's CPU seconds per operation, the
    replication messages and commands per operation, and collapsed stacks."""

    loops: int
    rate: float
    ran: float
    """Jobs/s the worker ran meanwhile (0: no worker)."""
    cpu_per_op: dict[str, float]
    replication: dict[str, float]
    stacks: dict[str, Path]


Counts = Callable[[], Awaitable[dict[str, float]]]
Ran = Callable[[], int]
"""How many jobs the worker has run so far."""


async def _phase(mesh: Mesh, target: Target, loops: int, seconds: float,
                 pids: dict[str, int], counts: Counts, ran: Ran, workdir: Path, name: str
                 ) -> Phase:
    """Run ``loops`` loops of ``target``'s operation while py-spy samples ``pids``."""
    ops = [target.ops(mesh, i) for i in range(loops)]
    done = 0
    running = True

    async def loop(op: Op) -> None:
        nonlocal done
        while running:
            await op()
            done += 1

    tasks = [asyncio.create_task(loop(op)) for op in ops]
    await asyncio.sleep(0.5)  # warm up
    outputs = {who: workdir / f"{name}-{who}.txt" for who in pids}
    spies = {who: _record(pid, seconds, outputs[who]) for who, pid in pids.items()}
    cpu = {who: _cpu_seconds(pid) for who, pid in pids.items()}
    before = await counts()
    first, ran_first, started = done, ran(), time.perf_counter()
    await asyncio.gather(*(asyncio.to_thread(spy.wait) for spy in spies.values()))
    n = max(done - first, 1)
    took = time.perf_counter() - started
    rate, ran_rate = (done - first) / took, (ran() - ran_first) / took
    per_op = {who: (_cpu_seconds(pid) - cpu[who]) / n for who, pid in pids.items()}
    after = await counts()
    running = False
    await asyncio.gather(*tasks)
    for who, spy in spies.items():
        if spy.returncode != 0 or not outputs[who].exists():
            error = spy.stderr.read().decode() if spy.stderr else ""
            raise RuntimeError(f"py-spy on {who} failed ({spy.returncode}): {error}")
    replication = {key: (after[key] - before[key]) / n for key in replication_counts.SERIES}
    return Phase(loops, rate, ran_rate, per_op, replication, outputs)


async def _profile(etcd: str, target: Target, pids: dict[str, int], counts: Counts,
                   ran: Ran, seconds: float, workdir: Path, name: str) -> dict[str, Phase]:
    async with Mesh(etcd=etcd, cluster=target.spec.name) as mesh:
        await target.ops(mesh, -1)()  # routes known, channels open
        pids = {**pids, "client": os.getpid()}
        return {phase: await _phase(mesh, target, loops, seconds, pids, counts, ran, workdir,
                                    f"{name}-{phase}")
                for phase, loops in target.phases.items()}


def _start_worker(stack: contextlib.ExitStack, workdir: Path, etcd: str, target: Target
                  ) -> tuple[int, Ran]:
    """A `bench.mesh_worker` pool on ``target.worker``: its pid and its jobs run."""
    counters = workdir / f"{target.worker}-counters"
    counters.mkdir()
    worker = Child("profile-worker", [
        sys.executable, "-m", "bench.mesh_worker", "--etcd", etcd,
        "--cluster", target.spec.name, "--queue", target.worker,
        "--concurrency", str(scheduler.WORKER_CONCURRENCY), "--counters", str(counters)],
        workdir / "profile-worker.log", env=services.python_env())
    stack.callback(worker.stop)
    worker.start()
    worker.wait_for_line("READY", scheduler.READY_TIMEOUT)
    total = counter.Total(counters)
    stack.callback(total.close)
    return worker.pid, lambda: total.value


def run(names: Sequence[str], seconds: float, output: Path) -> list[Path]:
    """Profile each named workload; returns the files written."""
    files = []
    with clusters.scratch_etcd("mesh-cpu-profile-") as (tmp, etcd):
        for name in names:
            # A cluster of its own per workload (two may share a spec).
            target = TARGETS[name]
            target = dataclasses.replace(target, spec=dataclasses.replace(
                target.spec, name=f"{target.spec.name}-{name}"))
            with contextlib.ExitStack() as stack:
                local = clusters.start_one(stack, tmp, etcd, target.spec)
                nodes = {node.node_id: node.pid for node in local.nodes}
                pids, ran = dict(nodes), (lambda: 0)
                if target.worker:
                    pids["worker"], ran = _start_worker(stack, tmp, etcd, target)
                phases = aio.run(_profile(etcd, target, pids, replication_counts.reader(local),
                                          ran, seconds, tmp, name))
            files += _write(name, target, phases, list(nodes), seconds, output)
    return files


def _write(name: str, target: Target, phases: dict[str, Phase], nodes: list[str],
           seconds: float, output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    setup = (f"{target.what} on 3 nodes ({target.spec.name}), py-spy {RATE} Hz, "
             f"{seconds:g} s per phase, CPU samples only; "
             f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    files = []
    whose = [("node", "the 3 nodes, summed"), ("client", "the bench process")]
    if target.worker:
        whose.append(("worker", "the worker pool's process"))
    for who, title in whose:
        lines = [f"# CPU profile of {name}: {title}", "", setup, ""]
        for phase_name, phase in phases.items():
            paths = [phase.stacks[n] for n in nodes] if who == "node" \
                else [phase.stacks[who]]
            stacks = Stacks.read(paths)
            cpu = ", ".join(f"{w} {1e3 * c:.3f} ms" for w, c in phase.cpu_per_op.items())
            messages = phase.replication.get(replication_counts.MESSAGES, 0.0)
            commands = phase.replication.get(replication_counts.COMMANDS, 0.0)
            worked = f", the worker ran {phase.ran:,.0f} jobs/s" if target.worker else ""
            lines += [f"## {phase_name}: {phase.loops} loop(s), {phase.rate:,.0f} "
                      f"{target.unit}s/s while sampled{worked}, {stacks.total:,} samples", "",
                      f"CPU per {target.unit} (user + system): {cpu}", "",
                      f"Replication per {target.unit}: {messages:.3f} messages sent, "
                      f"{commands:.3f} commands", "", *stacks.tables(), ""]
        path = output / f"{name}-{who}.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_profile",
                                description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                   help=f"what to profile: {', '.join(TARGETS)} (default: all)")
    p.add_argument("--seconds", type=float, default=10.0, help="sampled seconds per phase")
    p.add_argument("--output", type=Path, default=OUTPUT, help=f"directory (default {OUTPUT})")
    args = p.parse_args(argv)
    if args.seconds < 1:
        p.error("--seconds must be >= 1")
    unknown = [name for name in args.workloads if name not in TARGETS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    with tempfile.TemporaryDirectory():
        for path in run(args.workloads or list(TARGETS), args.seconds, args.output):
            print(f"written {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
