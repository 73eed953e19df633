"""The cluster rows: replicated Set throughput, the interceptor stack's cost against a
bare node, lock throughput against etcd's lock, event store throughput against the
echo server, job scheduler throughput against Celery on Redis, failover time,
rebalance time, memory per key against Redis and a big group's catch-up, and what
a growing cluster costs (placement balance, coordinator CPU, map fan-out),
notification fan-out against Redis Pub/Sub, the gateway, and sagas against the
same jobs chained by hand.

They run after the single-node rows, on an etcd of their own; each scenario
uses its own cluster names, and stops every process it started before the next
one begins (also when it fails).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import (
    events,
    failover,
    gateway,
    growth,
    locks,
    notify,
    rebalance,
    replicated,
    saga,
    scale,
    scheduler,
)
from bench import stack as interceptors
from bench.timing import Measurement
from common.localmesh import Etcd


@dataclass(frozen=True)
class ClusterResults:
    """The Set, interceptor stack, lock, event and scheduler measurements (for the
    ratio table), the scenario sections and the scheduler rows' setup."""

    measurements: list[Measurement]
    scenarios: dict[str, Any]


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}


def run(workdir: Path, args: argparse.Namespace) -> ClusterResults:
    """Every cluster scenario, one after the other, with ``args``' sizes."""
    with contextlib.ExitStack() as stack:
        etcd = Etcd(workdir / "cluster-etcd")
        etcd.workdir.mkdir()
        stack.callback(etcd.stop)
        etcd.start()
        sets = replicated.run(workdir, etcd.endpoint, args.warmup, args.seconds, args.rounds)
        # Cache GET with every interceptor on against a bare node, timed in the same rounds.
        gets = interceptors.run(workdir, etcd.endpoint, args.warmup, args.seconds, args.rounds)
        # Against etcd's own lock on this same etcd.
        cycles = locks.run(workdir, etcd.endpoint, args.warmup, args.seconds, args.rounds)
        # Against an echo server of their own, timed in the same rounds.
        stored = events.run(workdir, etcd.endpoint, args.warmup, args.seconds, args.rounds)
        # Against Celery on a redis-server of their own, timed in the same rounds.
        jobs = scheduler.run(workdir, etcd.endpoint, args.warmup, args.seconds, args.rounds)
        pause = 0.5 if args.quick else 1.0  # writes before the kill and after recovery
        runs = failover.run(workdir, etcd.endpoint, args.failover_runs, pause, pause)
        joined = rebalance.run(workdir, etcd.endpoint, args.rebalance_keys)
        grown = growth.run(workdir, etcd.endpoint, args.growth_keys)
        scaled = scale.run(etcd.endpoint, scale.QUICK if args.quick else scale.Sizes())
        fanned = notify.run(workdir, etcd.endpoint, notify.QUICK if args.quick
                            else notify.Sizes())
        edge = gateway.run(workdir, etcd.endpoint, gateway.QUICK if args.quick
                           else gateway.Sizes())
        sagas = saga.run(workdir, etcd.endpoint, saga.QUICK if args.quick else saga.Sizes())
    return ClusterResults(sets + gets + cycles + stored + jobs, {
        "scheduler": scheduler.environment(),
        "failover": failover.summary(runs),
        "rebalance": {"setup": f"3 nodes, R=1 sync, {rebalance.VALUE_BYTES}-byte values "
                               f"loaded by mset in batches of {rebalance.BATCH}; a 4th joins",
                      **_rounded(asdict(joined))},
        "growth": {"setup": growth.SETUP, "goal_ratio": growth.GOAL, **asdict(grown)},
        "scale": scaled,
        "notify": fanned,
        "gateway": edge,
        "saga": sagas,
    })
