"""The benchmark's child processes: etcd, a coordinator and one node, the echo server,
redis-server.

All of them are started inside one ``running_services()`` block and stopped when it
exits, normally, on error or on Ctrl-C; ``common.localmesh`` children also die
with the benchmark if it is killed outright (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import aio
from common.clustermap import wait_settled
from common.localmesh import Child, LocalMesh, RedisServer

CLUSTER = "bench"
ROOT = Path(__file__).resolve().parent.parent


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a Python child the benchmark starts (``python -m
    bench.x``): this one's, unbuffered, with the checkout importable; plus ``extra``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


@dataclass(frozen=True)
class Endpoints:
    """Where the benchmark's servers listen."""

    etcd: str
    cluster: str
    node: str
    echo: str
    redis_port: int


def _started(stack: contextlib.ExitStack, child: Child) -> Child:
    stack.callback(child.stop)
    child.start()
    return child


def start_echo(stack: contextlib.ExitStack, workdir: Path, value_bytes: int) -> str:
    argv = [sys.executable, "-m", "bench.echo_server", "--listen", "127.0.0.1:0",
            "--value-bytes", str(value_bytes)]
    child = _started(stack, Child("echo-server", argv, workdir / "echo.log", env=python_env()))
    return child.wait_for_line("READY ", 30.0).removeprefix("READY ").strip()


def start_redis(stack: contextlib.ExitStack, workdir: Path) -> int:
    """redis-server on a free port (stopped with ``stack``); its port."""
    server = RedisServer(workdir)
    stack.callback(server.stop)
    server.start()
    return server.port


@contextlib.contextmanager
def running_services(workdir: Path, value_bytes: int) -> Iterator[Endpoints]:
    """Start etcd, a coordinator, one node, the echo server and redis-server; stop them
    all on exit. Yields once the node serves (its cluster map is settled)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        local = LocalMesh(workdir=workdir, cluster=CLUSTER, _owns_workdir=False)
        stack.callback(local.stop)  # coordinator, then nodes, then etcd
        etcd = local.start_etcd()
        # A node serves nothing until the coordinator has written a map with it in.
        local.start_coordinator(["--replicas", "0", "--min-nodes", "1"])
        node = local.start_node()
        aio.run(wait_settled(etcd, CLUSTER, [node.node_id], replicas=0, timeout=30))
        echo = start_echo(stack, workdir, value_bytes)
        redis_port = start_redis(stack, workdir)
        yield Endpoints(etcd, CLUSTER, node.address, echo, redis_port)
