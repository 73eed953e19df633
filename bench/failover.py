"""Failover time: SIGKILL the primary of a probe key's group while clients write.

Each run gets a fresh 3-node cluster (R=1 sync, 2 s leases) and kills another
node (run 1 node-1, run 2 node-2, ...) through a probe key that node leads. Four
writers Set new keys throughout and remember every acknowledged write. After
the kill a probe loop Sets the probe key (0.5 s per call) until one succeeds:
that is the recovery time. Afterwards every acknowledged key must read back (mget).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import aio, clusters
from clients import Mesh
from common.clustermap import wait_settled
from common.localmesh import LocalMesh

LEASE_TTL = 2
PROBE_TIMEOUT = 0.5
PROBE_LIMIT = 30.0
WRITERS = 4
CLIENT_TIMEOUT = 10.0
VALUE_BYTES = 100
PROBE_PREFIX = "failover-probe"


@dataclass(frozen=True)
class Run:
    """One kill and what followed it."""

    victim: str
    recovered_s: float
    """Kill -> the first successful Set of the probe key."""
    resettled_s: float | None
    """Kill -> a settled map over the two survivors (None: not within 30 s)."""
    probe_attempts: int
    probe_errors: dict[str, int]
    acked_writes: int
    lost_writes: int
    writer_errors: dict[str, int]


def _error_name(exc: BaseException) -> str:
    reason = getattr(exc, "reason", "")
    return f"{type(exc).__name__}({reason})" if reason else type(exc).__name__


def _value(key: str) -> bytes:
    return (key.encode() * (VALUE_BYTES // len(key) + 1))[:VALUE_BYTES]


@dataclass
class _Writers:
    """Set loops on new keys; ``acked`` holds every write the client confirmed."""

    mesh: Mesh
    acked: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(w)) for w in range(WRITERS)]

    async def _loop(self, worker: int) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            key = f"fw{worker}-{n}"
            try:
                await self.mesh.cache.set(key, _value(key))
            except Exception as exc:
                self.errors[_error_name(exc)] += 1
                await asyncio.sleep(0.05)
                continue
            self.acked.append(key)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def lost(self) -> int:
        values = await self.mesh.cache.mget(self.acked) if self.acked else []
        return sum(v != _value(k) for k, v in zip(self.acked, values, strict=True))


async def _probe(mesh: Mesh, key: str, since: float) -> tuple[float, int, Counter[str]]:
    """Set ``key`` until it works: (seconds since ``since``, attempts, errors)."""
    errors: Counter[str] = Counter()
    for attempt in itertools.count(1):
        try:
            await mesh.cache.set(key, _value(key), timeout=PROBE_TIMEOUT)
            return time.monotonic() - since, attempt, errors
        except Exception as exc:
            errors[_error_name(exc)] += 1
            if time.monotonic() - since > PROBE_LIMIT:
                raise TimeoutError(f"no Set of {key!r} succeeded within "
                                   f"{PROBE_LIMIT:g} s of the kill") from exc
            await asyncio.sleep(0.02)
    raise AssertionError("unreachable")


async def _resettled(local: LocalMesh, survivors: list[str], since: float
                     ) -> float | None:
    with contextlib.suppress(TimeoutError):
        await wait_settled(local.etcd_endpoint, local.cluster, survivors, 1, timeout=30)
        return time.monotonic() - since
    return None


async def _once(local: LocalMesh, victim_id: str, before: float, after: float) -> Run:
    async with Mesh(etcd=local.etcd_endpoint, cluster=local.cluster,
                    timeout=CLIENT_TIMEOUT) as mesh:
        if mesh.table is None:
            raise RuntimeError(f"{local.cluster}: the client has no cluster map")
        probe = mesh.table.key_led_by(victim_id, PROBE_PREFIX)
        victim = next(n for n in local.nodes if n.node_id == victim_id)
        survivors = [n.node_id for n in local.nodes if n is not victim]
        await mesh.cache.set(probe, _value(probe))
        writers = _Writers(mesh)
        writers.start()
        await asyncio.sleep(before)

        victim.child.signal(signal.SIGKILL)
        killed = time.monotonic()
        resettle = asyncio.create_task(_resettled(local, survivors, killed))
        try:
            recovered, attempts, probe_errors = await _probe(mesh, probe, killed)
            await asyncio.sleep(after)
        except BaseException:
            resettle.cancel()
            raise
        finally:
            await writers.stop()
        resettled = await resettle
        return Run(victim_id, recovered, resettled, attempts, dict(probe_errors),
                   len(writers.acked), await writers.lost(), dict(writers.errors))


def run(workdir: Path, etcd: str, runs: int, before: float = 1.0, after: float = 1.0
        ) -> list[Run]:
    """``runs`` kills, each on a fresh cluster; every process is stopped after each."""
    results = []
    for i in range(runs):
        spec = clusters.Spec(f"failover-{i + 1}", lease_ttl=LEASE_TTL)
        with contextlib.ExitStack() as stack:
            local = clusters.start_one(stack, workdir, etcd, spec)
            victim = local.nodes[i % len(local.nodes)].node_id
            result = aio.run(_once(local, victim, before, after))
        resettled = f"{result.resettled_s:.2f} s" if result.resettled_s is not None else "-"
        print(f"[failover {i + 1}/{runs}] killed {result.victim}: writes again after "
              f"{result.recovered_s:.2f} s, map re-settled after {resettled}; "
              f"{result.lost_writes} of {result.acked_writes} acknowledged writes lost",
              file=sys.stderr, flush=True)
        results.append(result)
    return results


def summary(runs: list[Run]) -> dict[str, Any]:
    """The JSON section: min/median/max recovery, totals, and every run."""
    recovered = [r.recovered_s for r in runs]
    resettled = [r.resettled_s for r in runs if r.resettled_s is not None]

    def spread(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
                "max": round(max(values), 3)}

    return {
        "setup": f"3 nodes, R=1 sync, lease TTL {LEASE_TTL} s, {WRITERS} writers of new "
                 f"keys; probe Set timeout {PROBE_TIMEOUT:g} s",
        "lease_ttl_s": LEASE_TTL,
        "probe_timeout_s": PROBE_TIMEOUT,
        "recovered_s": spread(recovered),
        "resettled_s": spread(resettled),
        "acked_writes": sum(r.acked_writes for r in runs),
        "lost_writes": sum(r.lost_writes for r in runs),
        "writer_errors": sum(sum(r.writer_errors.values()) for r in runs),
        "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(r).items()}
                 for r in runs],
    }
