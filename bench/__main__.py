"""``python -m bench``: start the servers, run every workload, print and save the results.

The results go to ``--output`` (results.json) and a chart of every ratio against
its goal next to it (results.png, ``bench.chart``).

Options: ``--seconds`` (measured window per workload), ``--warmup``, ``--rounds``,
``--failover-runs``, ``--rebalance-keys``, ``--quick`` (a smoke run with tiny
sizes), ``--output`` (results.json path).

First the single-node rows (etcd, a coordinator and one node against the echo
server and redis-server), then the cluster rows (``bench.cluster``): replicated
Set throughput on 3-node clusters, cache GET through the full interceptor stack
(auth, rate limit, tracing, metrics) against a bare node, both single-node
clusters (``bench.stack``), lock acquire+release cycles against etcd's own lock
on the same etcd (``bench.locks``), event store appends, reads and subscription
delivery against an echo server (``bench.events``), job scheduler enqueues and
end-to-end jobs against Celery with a Redis broker (``bench.scheduler``),
failover time and rebalance time, on 3- and 4-node clusters; then the cost as data
grows (``bench.growth``): node memory per cache key against Redis's, and a
replica's catch-up of a group holding every key, with GET latency meanwhile.

Each workload's warmup and window are split into ``--rounds`` rounds and the
rounds run interleaved (every workload once, then again, ...), so a load spike on
the machine hits a Mesh workload and its baseline alike instead of skewing a ratio.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from bench import aio, chart, cluster, report, standalone
from bench.progress import Progress
from bench.services import Endpoints, running_services
from bench.timing import Measurement, combine, measure
from bench.workloads import VALUE_BYTES, connected, prepare, workloads

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0,
                   help="measured wall-clock seconds per workload, over all rounds (default 3)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="unmeasured warmup seconds per workload, over all rounds (default 1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="split each warmup and window into this many interleaved rounds "
                        "(default 3)")
    p.add_argument("--failover-runs", type=int, default=3,
                   help="primaries killed, each in a fresh 3-node cluster (default 3)")
    p.add_argument("--rebalance-keys", type=int, default=100_000,
                   help="keys the 3 nodes hold when a 4th joins (default 100000)")
    p.add_argument("--growth-keys", type=int, default=1_000_000,
                   help="100-byte cache keys loaded into one node and Redis to compare "
                        "memory, then copied to a new replica (default 1000000)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 0.2 s windows after 0.05 s warmups, one round, "
                        "one failover, 2000 keys to rebalance, 20000 keys to grow")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help=f"where to write the JSON results (default {DEFAULT_OUTPUT})")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds = 0.2, 0.05, 1
        args.failover_runs, args.rebalance_keys, args.growth_keys = 1, 2000, 20_000
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1:
        p.error("--seconds must be > 0, --warmup >= 0 and --rounds >= 1")
    if args.failover_runs < 1 or args.rebalance_keys < 1 or args.growth_keys < 1:
        p.error("--failover-runs, --rebalance-keys and --growth-keys must be >= 1")
    return args


async def run(args: argparse.Namespace, endpoints: Endpoints, load_before: float
              ) -> tuple[list[Measurement], dict[str, Any]]:
    warmup, window = args.warmup / args.rounds, args.seconds / args.rounds
    async with connected(endpoints) as clients:
        info = await prepare(clients)
        work = workloads(clients)
        progress = Progress(len(work) * args.rounds)
        parts: dict[str, list[Measurement]] = {w.name: [] for w in work}
        for _ in range(args.rounds):
            for workload in work:
                m = await measure(workload, warmup, window, progress)
                keys = f", {m.keys_per_s:,.0f} keys/s" if workload.batch > 1 else ""
                progress.finish(f"{m.ops_per_s:,.0f} ops/s{keys}")
                parts[workload.name].append(m)
    measurements = [combine(p) for p in parts.values()]
    environment = {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": standalone.version("protobuf"),
        "server_event_loop": aio.SERVER_LOOP + (
            f" {standalone.version('uvloop')}" if aio.SERVER_LOOP == "uvloop" else ""),
        "redis_py": standalone.version("redis"),
        "redis_server": str(info.get("redis_version", "unknown")),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_before": round(load_before, 2),
        "platform": platform.platform(),
        "warmup_s": args.warmup,
        "window_s": args.seconds,
        "rounds": args.rounds,
        "value_bytes": VALUE_BYTES,
        "quick": args.quick,
    }
    return measurements, environment


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    load_before = os.getloadavg()[0]  # other work on the machine skews every number
    try:
        with tempfile.TemporaryDirectory(prefix="mesh-bench-") as workdir:
            with running_services(Path(workdir) / "single", VALUE_BYTES) as endpoints:
                measurements, environment = aio.run(run(args, endpoints, load_before))
            clustered = cluster.run(Path(workdir), args)
    except KeyboardInterrupt:
        print("\ninterrupted; every child process was stopped", file=sys.stderr)
        return 130
    results = report.build(measurements + clustered.measurements, environment,
                           clustered.scenarios)
    print(report.markdown(results))
    report.write_json(results, args.output)
    picture = args.output.with_suffix(".png")
    chart.draw(results, picture)
    print(f"\nresults written to {args.output}, chart to {picture}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
