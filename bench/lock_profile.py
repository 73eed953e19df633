"""Where a lock acquire+release cycle spends its CPU: py-spy on the nodes and the client.

``python -m bench.lock_profile`` starts the lock rows' R=1 cluster (3 nodes) on an etcd of
its own, runs the lock rows' loops (one lock in one loop, then 16 locks in 16
loops) and samples every node and the bench process itself with py-spy while
they run (py-spy reads another process's memory: it needs root or ptrace
rights). It writes, per phase, the share of samples each function spends on
CPU itself (self) and under it (cumulative), the nodes summed, to
``bench/profiles/lock-node.txt`` and the client's to ``lock-client.txt``.
Samples count only the thread holding the GIL (py-spy ``--gil``), so the shares
say where the Python CPU goes, not where calls wait; time in C extensions (gRPC's
Cython core, protobuf's upb) is charged to the Python function that called
them (often asyncio's ``Handle._run``, for gRPC's callbacks). Each phase also
gives every process's CPU seconds (user + system, from /proc) per cycle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import aio, clusters
from bench.locks import SPECS, TTL, WAIT, _cycles, _mesh_cycle
from clients import Mesh

OUTPUT = Path(__file__).resolve().parent / "profiles"
RATE = 200
"""py-spy samples per second per process."""
TOP = 30
"""Functions listed per table."""
PHASES = {"seq": 1, "c16": 16}
"""Phase name -> locks (and loops) in parallel, as the lock rows."""


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


@dataclass(frozen=True)
class Phase:
    """One phase's cycles/s, each process's CPU seconds per cycle and collapsed stacks."""

    rate: float
    cpu_per_cycle: dict[str, float]
    stacks: dict[str, Path]


async def _phase(mesh: Mesh, loops: int, seconds: float, pids: dict[str, int],
                 workdir: Path, name: str) -> Phase:
    """Run ``loops`` acquire+release loops while py-spy samples ``pids``."""
    names = [f"profile-lock:{name}-{i}" for i in range(loops)]
    op = _cycles(names, _mesh_cycle(mesh))
    done = 0
    running = True

    async def loop() -> None:
        nonlocal done
        while running:
            await op()
            done += 1

    tasks = [asyncio.create_task(loop()) for _ in range(loops)]
    await asyncio.sleep(0.5)  # warm up
    outputs = {who: workdir / f"{name}-{who}.txt" for who in pids}
    spies = {who: _record(pid, seconds, outputs[who]) for who, pid in pids.items()}
    cpu = {who: _cpu_seconds(pid) for who, pid in pids.items()}
    first, started = done, time.perf_counter()
    await asyncio.gather(*(asyncio.to_thread(spy.wait) for spy in spies.values()))
    cycles = done - first
    rate = cycles / (time.perf_counter() - started)
    per_cycle = {who: (_cpu_seconds(pid) - cpu[who]) / max(cycles, 1)
                 for who, pid in pids.items()}
    running = False
    await asyncio.gather(*tasks)
    for who, spy in spies.items():
        if spy.returncode != 0 or not outputs[who].exists():
            error = spy.stderr.read().decode() if spy.stderr else ""
            raise RuntimeError(f"py-spy on {who} failed ({spy.returncode}): {error}")
    return Phase(rate, per_cycle, outputs)


async def _profile(etcd: str, node_pids: dict[str, int], seconds: float, workdir: Path
                   ) -> dict[str, Phase]:
    async with Mesh(etcd=etcd, cluster=SPECS["r1"].name) as mesh:
        lease = await mesh.locks.acquire("profile-lock:check", ttl=TTL, wait=WAIT)
        await lease.release()
        pids = {**node_pids, "client": os.getpid()}
        return {name: await _phase(mesh, loops, seconds, pids, workdir, name)
                for name, loops in PHASES.items()}


def run(seconds: float, output: Path) -> list[Path]:
    """Profile the lock loops; returns the files written."""
    with clusters.scratch_etcd("mesh-lock-profile-") as (tmp, etcd), \
            contextlib.ExitStack() as stack:
        local = clusters.start_one(stack, tmp, etcd, SPECS["r1"])
        nodes = {node.node_id: node.pid for node in local.nodes}
        phases = aio.run(_profile(etcd, nodes, seconds, tmp))
        return _write(phases, list(nodes), seconds, output)


def _write(phases: dict[str, Phase], nodes: list[str], seconds: float, output: Path
           ) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    setup = (f"mesh.locks acquire+release on 3 nodes, R=1 sync ({SPECS['r1'].name}, as "
             f"bench.locks), py-spy {RATE} Hz, {seconds:g} s per phase, CPU samples only; "
             f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    files = []
    for who, title in (("node", "the 3 nodes, summed"), ("client", "the bench process")):
        lines = [f"# Lock profile: {title}", "", setup, ""]
        for name, phase in phases.items():
            paths = [phase.stacks[n] for n in nodes] if who == "node" \
                else [phase.stacks["client"]]
            stacks = Stacks.read(paths)
            cpu = ", ".join(f"{w} {1e3 * c:.2f} ms" for w, c in phase.cpu_per_cycle.items())
            lines += [f"## {name}: {PHASES[name]} lock(s) in {PHASES[name]} loop(s), "
                      f"{phase.rate:,.0f} cycles/s while sampled, {stacks.total:,} samples",
                      "", f"CPU per cycle (user + system): {cpu}", "",
                      *stacks.tables(), ""]
        path = output / f"lock-{who}.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lock_profile",
                                description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="sampled seconds per phase")
    p.add_argument("--output", type=Path, default=OUTPUT, help=f"directory (default {OUTPUT})")
    args = p.parse_args(argv)
    if args.seconds < 1:
        p.error("--seconds must be >= 1")
    with tempfile.TemporaryDirectory():
        for path in run(args.seconds, args.output):
            print(f"written {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
