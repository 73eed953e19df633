"""``python -m bench.<rows>``: one family of cluster rows on an etcd of its own,
printing its table (the lock, event store, scheduler and interceptor-stack rows
offer this)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from bench.timing import Measurement
from common.localmesh import Etcd

Rows = Callable[[Path, str, float, float, int], list[Measurement]]
"""``run(workdir, etcd, warmup, window, rounds)`` of a rows module."""


def version(package: str) -> str:
    """An installed package's version, for the results' setup lines."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def main(prog: str, description: str, run: Rows,
         table: Callable[[list[Measurement]], str], argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per workload")
    p.add_argument("--warmup", type=float, default=1.0, help="warmup seconds per workload")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 0.2 s windows after 0.05 s warmups, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds = 0.2, 0.05, 1
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1:
        p.error("--seconds must be > 0, --warmup >= 0 and --rounds >= 1")
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as workdir, \
            contextlib.ExitStack() as stack:
        server = Etcd(Path(workdir) / "etcd")
        server.workdir.mkdir()
        stack.callback(server.stop)
        server.start()
        measurements = run(Path(workdir), server.endpoint, args.warmup, args.seconds,
                           args.rounds)
    print(table(measurements))
    return 0
