"""Starting whole clusters for the cluster rows: a coordinator and N nodes on a shared etcd.

Every cluster has its own name (etcd key prefix) and its own directory under the
benchmark's workdir. ``start`` registers ``LocalMesh.stop`` on the caller's
ExitStack before launching anything, so a failed start still stops what did start.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import aio
from common.clustermap import wait_settled
from common.localmesh import Etcd, LocalMesh, NodeProcess


@dataclass(frozen=True)
class Spec:
    """One cluster: its name, size and replication settings, and any more node flags."""

    name: str
    nodes: int = 3
    replicas: int = 1
    replication: str = "sync"
    lease_ttl: int = 5
    extra_flags: tuple[str, ...] = ()
    """Appended to every node's flags (so they override the ones set here)."""
    secure_peers: bool = True
    """A cluster secret guards the internal plane (as in production); False leaves
    it open, the baseline of the peer-authentication rows."""

    @property
    def node_flags(self) -> list[str]:
        # A quick stop: a replicated node otherwise waits out its whole shutdown
        # grace (its peers' replication streams stay open). Only SIGTERM is affected.
        return ["--cache-replication", self.replication,
                "--drain-delay", "0", "--shutdown-grace", "1", *self.extra_flags]


def _local(workdir: Path, etcd: str, spec: Spec) -> LocalMesh:
    local = LocalMesh(workdir=workdir / spec.name, cluster=spec.name,
                      lease_ttl=spec.lease_ttl, _owns_workdir=False,
                      secure_peers=spec.secure_peers)
    local.workdir.mkdir(parents=True)
    local.etcd_endpoint = etcd
    return local


def _logs_on_error(local: LocalMesh) -> Callable[..., bool]:
    """An ExitStack exit callback: print the cluster's process logs if a step failed."""
    def report(exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is not None and issubclass(exc_type, Exception):
            print(f"===== process logs of cluster {local.cluster} =====\n{local.logs()}",
                  file=sys.stderr)
        return False
    return report


def add_node(local: LocalMesh, spec: Spec) -> NodeProcess:
    """Start one more node of ``spec`` (blocks until it is READY)."""
    return local.start_node(f"node-{len(local.nodes) + 1}", spec.node_flags)


def start(stack: contextlib.ExitStack, workdir: Path, etcd: str,
          specs: Sequence[Spec], timeout: float = 60.0) -> list[LocalMesh]:
    """Start each cluster in ``specs`` (coordinator, then nodes); wait until every map
    is settled."""
    locals_ = [_local(workdir, etcd, spec) for spec in specs]
    for local in locals_:
        stack.callback(local.stop)
        stack.push(_logs_on_error(local))
    # One at a time, from this thread: with PR_SET_PDEATHSIG a child dies with the
    # *thread* that started it, so a worker pool's threads cannot start them.
    for local, spec in zip(locals_, specs, strict=True):
        local.start_coordinator(["--replicas", str(spec.replicas),
                                 "--min-nodes", str(spec.nodes)])
        local.start_nodes(spec.nodes, spec.node_flags)

    async def settle() -> None:
        await asyncio.gather(*(
            wait_settled(etcd, local.cluster, [n.node_id for n in local.nodes],
                         spec.replicas, timeout)
            for local, spec in zip(locals_, specs, strict=True)))

    aio.run(settle())
    return locals_


def start_one(stack: contextlib.ExitStack, workdir: Path, etcd: str, spec: Spec) -> LocalMesh:
    """``start`` for a single cluster."""
    return start(stack, workdir, etcd, [spec])[0]


@contextlib.contextmanager
def scratch_etcd(prefix: str) -> Iterator[tuple[Path, str]]:
    """A temporary directory and an etcd of its own in it: (directory, endpoint),
    for a bench module run by itself (``python -m bench.notify``)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, contextlib.ExitStack() as stack:
        etcd = Etcd(Path(tmp) / "etcd")
        etcd.workdir.mkdir()
        stack.callback(etcd.stop)
        etcd.start()
        yield Path(tmp), etcd.endpoint
