"""Timing one workload: N workers repeat an operation; count completions in a window.

The workers run through a warmup and then a fixed wall-clock window without
pausing, so the window sees steady state with exactly ``concurrency`` operations
in flight. Only operations that complete inside the window are counted. A run
may time each workload in several rounds (interleaved with the others) and
``combine`` them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from bench.progress import Progress

Op = Callable[[], Awaitable[object]]

_TICK = 0.1
_EMPTY_WINDOW_LIMIT = 60.0
"""Seconds a window may run past its end waiting for its first completed operation."""


@dataclass(frozen=True)
class Workload:
    """One operation to repeat; ``batch`` is how many keys each operation reads."""

    name: str
    description: str
    op: Op
    concurrency: int = 1
    batch: int = 1
    counters: Callable[[], Awaitable[dict[str, float]]] | None = None
    """Read at the start and the end of the measured window (while the workers
    run); the measurement keeps the differences (``Measurement.counted``)."""


@dataclass(frozen=True)
class Measurement:
    """Operations completed in the window and the window's exact length.

    A combined measurement (see ``combine``) keeps each round's rate in ``rounds``.
    """

    workload: Workload
    ops: int
    seconds: float
    rounds: tuple[float, ...] = ()
    counted: dict[str, float] = field(default_factory=dict)
    """How much each of the workload's counters moved over the window(s)."""

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def keys_per_s(self) -> float:
        return self.ops_per_s * self.workload.batch


async def _spent() -> None:
    raise RuntimeError("this workload's clients are closed")


def combine(parts: list[Measurement]) -> Measurement:
    """One workload's rounds as one measurement: all operations over all windows.

    The result keeps the workload's name and shape but not its ``op``: the op holds
    clients and their gRPC channels, which must be freed when the event loop that
    used them ends (a grpc.aio channel alive across ``asyncio.run`` calls keeps
    gRPC's poller bound to the closed loop, which then gets late events).
    """
    workload = replace(parts[0].workload, op=_spent, counters=None)
    counted: dict[str, float] = {}
    for part in parts:
        for name, value in part.counted.items():
            counted[name] = counted.get(name, 0.0) + value
    return Measurement(workload, sum(p.ops for p in parts),
                       sum(p.seconds for p in parts), tuple(p.ops_per_s for p in parts),
                       counted)


async def interleaved(work: list[Workload], warmup: float, window: float, rounds: int,
                      unit: str = "ops/s") -> list[Measurement]:
    """Time every workload in ``rounds`` interleaved rounds (so drift on the machine
    hits them all alike) and combine each one's rounds; ``warmup`` and ``window``
    are per round."""
    progress = Progress(len(work) * rounds)
    parts: dict[str, list[Measurement]] = {w.name: [] for w in work}
    for _ in range(rounds):
        for workload in work:
            m = await measure(workload, warmup, window, progress)
            progress.finish(f"{m.ops_per_s:,.0f} {unit}")
            parts[workload.name].append(m)
    return [combine(p) for p in parts.values()]


async def measure(workload: Workload, warmup: float, window: float,
                  progress: Progress) -> Measurement:
    """Run ``workload`` for ``warmup`` then ``window`` seconds; raise if an operation fails."""
    completed = 0
    running = True

    async def worker() -> None:
        nonlocal completed
        op = workload.op
        while running:
            await op()
            completed += 1

    progress.start(workload.name)
    tasks = [asyncio.create_task(worker()) for _ in range(workload.concurrency)]
    start = time.perf_counter()
    total = warmup + window
    try:
        await _run_until(tasks, start + warmup, start, total, progress)
        before = await workload.counters() if workload.counters is not None else {}
        first, t0 = completed, time.perf_counter()
        await _run_until(tasks, t0 + window, start, total, progress)
        # A window in which nothing completed measures nothing (a tiny --quick
        # window on a loaded machine): it goes on until one operation does.
        while completed == first:
            if time.perf_counter() - t0 > _EMPTY_WINDOW_LIMIT:
                raise RuntimeError(f"no {progress.name} operation completed in "
                                   f"{_EMPTY_WINDOW_LIMIT:g} s")
            await _run_until(tasks, time.perf_counter() + _TICK, start, total, progress)
        last, t1 = completed, time.perf_counter()
        after = await workload.counters() if workload.counters is not None else {}
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    running = False  # let the calls in flight finish; they are not counted
    await asyncio.gather(*tasks)
    return Measurement(workload, last - first, t1 - t0,
                       counted={name: after[name] - before[name] for name in before})


async def _run_until(tasks: list[asyncio.Task[None]], deadline: float, start: float,
                     total: float, progress: Progress) -> None:
    """Keep the workers going until ``deadline`` (perf_counter), ticking the progress bar."""
    while (remaining := deadline - time.perf_counter()) > 0:
        done, _ = await asyncio.wait(tasks, timeout=min(_TICK, remaining),
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done:  # a worker only ends early by raising
            task.result()
            raise RuntimeError(f"a {progress.name} worker stopped early")
        progress.tick(time.perf_counter() - start, total)
