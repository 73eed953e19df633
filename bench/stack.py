"""Interceptor stack cost: cache GET with auth, rate limit, tracing, metrics vs. a bare node.

Two single-node clusters (R=0) run on the cluster rows' etcd:

- **full**: every interceptor on. ``--auth-tokens`` (a static token file; the
  client sends its bearer token on every call), ``--rate-limit`` (per-tenant
  token buckets, local mode, at a rate no run comes near: every call takes a
  token, none is refused), ``--tracing file:DIR`` (OpenTelemetry's server
  interceptor makes a span per call; the batch processor exports them as JSON
  lines from its own thread) and ``/metrics`` served (the default, with its
  snapshot refresh);
- **bare**: no auth, no rate limit, tracing off and ``--metrics-listen ""``.
  The node still counts its RPCs in its metrics registry (it always does); it
  only serves no endpoint.

Both are read through the typed client (``mesh.cache.get``, 100-byte values,
the single-node rows' keys), 1 and 64 calls in flight, interleaved in rounds
(bare, full, bare, full, ...) so drift on the machine hits both alike. The
ratio full / bare is what the stack leaves of a GET's throughput. After the
rounds the full node must have exported spans (a refused call would already
have failed its workload).

``python -m bench.stack`` runs only these rows (its own etcd) and prints their table.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bench import aio, clusters, report, standalone
from bench.timing import Measurement, Op, Workload, interleaved
from bench.workloads import KEYS, VALUES
from clients import Mesh

TOKEN, TENANT = "bench-stack-token", "bench"
RATE = 1_000_000.0
"""Calls/s per tenant and burst: far above any rate here, so the limiter never refuses."""
CONCURRENCY = (1, 64)
TOKENS = {"bare": "", "full": TOKEN}
"""Variant -> the client's bearer token; the bare one first (the baseline of each pair)."""
TITLES = {
    "bare": "1 node, no auth, no rate limit, tracing and /metrics off",
    "full": "1 node, bearer-token auth, rate limit, tracing to file, /metrics",
}
SPANS_TIMEOUT = 5.0
"""How long the full node may take to export its first spans after the rounds."""


def workload_name(variant: str, in_flight: int) -> str:
    """``cluster.stack.bare.get.seq``, ``cluster.stack.full.get.c64``, ..."""
    return f"cluster.stack.{variant}.get.{'seq' if in_flight == 1 else f'c{in_flight}'}"


def specs(files: Path) -> dict[str, clusters.Spec]:
    """Each variant's cluster; the full one's token file and span directory in ``files``."""
    tokens = files / "tokens"
    tokens.write_text(f"{TOKEN} {TENANT}\n")
    return {
        "bare": clusters.Spec("stack-bare", nodes=1, replicas=0,
                              extra_flags=("--metrics-listen", "")),
        "full": clusters.Spec("stack-full", nodes=1, replicas=0, extra_flags=(
            "--auth-tokens", str(tokens), "--rate-limit", f"{RATE:g}",
            "--rate-limit-burst", f"{RATE:g}", "--tracing", f"file:{files / 'spans'}")),
    }


def _get(mesh: Mesh) -> Op:
    keys = itertools.cycle(KEYS)
    return lambda: mesh.cache.get(next(keys))


def workloads(meshes: dict[str, Mesh]) -> list[Workload]:
    """bare then full, at each concurrency."""
    return [
        Workload(workload_name(variant, n),
                 f"mesh.cache.get, {TITLES[variant]}, {n} in flight", _get(meshes[variant]), n)
        for n in CONCURRENCY for variant in TOKENS
    ]


@contextlib.asynccontextmanager
async def _connected(etcd: str, names: dict[str, str]) -> AsyncIterator[dict[str, Mesh]]:
    """A client per variant (the full one with the token), each node loaded with the
    data set and checked."""
    async with contextlib.AsyncExitStack() as stack:
        meshes = {variant: await stack.enter_async_context(
                      Mesh(etcd=etcd, cluster=names[variant], token=token))
                  for variant, token in TOKENS.items()}
        for variant, mesh in meshes.items():
            await mesh.cache.mset(list(zip(KEYS, VALUES, strict=True)))
            if await mesh.cache.mget(KEYS) != VALUES:
                raise RuntimeError(f"data check failed on the {variant} node")
        yield meshes


async def _measure(etcd: str, names: dict[str, str], warmup: float, window: float,
                   rounds: int) -> list[Measurement]:
    async with _connected(etcd, names) as meshes:
        return await interleaved(workloads(meshes), warmup, window, rounds, "calls/s")


def _check_exported(directory: Path) -> None:
    """Wait for spans in ``directory`` (the node's ``<pid>.jsonl``); raise if none come."""
    deadline = time.monotonic() + SPANS_TIMEOUT
    while not any(f.stat().st_size for f in directory.glob("*.jsonl")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the full-stack node exported no spans to {directory} "
                               f"within {SPANS_TIMEOUT:g} s")
        time.sleep(0.1)


def run(workdir: Path, etcd: str, warmup: float, window: float, rounds: int
        ) -> list[Measurement]:
    """Start both single-node clusters, time the GETs, check the full node traced
    them, stop the clusters.

    ``warmup`` and ``window`` are per workload over all ``rounds``.
    """
    files = workdir / "stack-files"
    files.mkdir()
    wanted = specs(files)
    with contextlib.ExitStack() as stack:
        started = dict(zip(wanted, clusters.start(stack, workdir, etcd, list(wanted.values())),
                           strict=True))
        # The bare node serves no /metrics; the full one does.
        if started["bare"].nodes[0].metrics or not started["full"].nodes[0].metrics:
            raise RuntimeError("expected /metrics on the full-stack node only")
        measurements = aio.run(_measure(etcd, {v: s.name for v, s in wanted.items()},
                                        warmup / rounds, window / rounds, rounds))
        _check_exported(files / "spans")
        return measurements


def main(argv: list[str] | None = None) -> int:
    """Only the interceptor stack rows, on an etcd of their own: print their ratios."""
    return standalone.main("python -m bench.stack", __doc__.splitlines()[0], run,
                           report.stack_markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
