"""Test helpers for whole clusters: waiting for nodes to serve, a writer that records
every acknowledged write, and checks that replicas hold what primaries do. (Reading
the map and waiting for it to settle: `common.clustermap`.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import Mesh
from clients.errors import MeshError
from common.clustermap import RoutingTable
from common.etcd import client_for
from common.localmesh import LocalMesh, _with_parent_death
from common.membership import NodeInfo, node_key
from common.peer import COORDINATOR, PeerKey, PeerSigner
from common.tls import Tls, open_channel
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.replication.v1 import replication_pb2_grpc as rpb_grpc

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tenant-token-1"
"""A client-role bearer token of tenant ``TENANT`` in `auth_flags`' token file."""
TENANT = "acme"


def auth_flags(workdir: Path) -> list[str]:
    """Node flags that turn client authentication on (a token file with ``TOKEN``
    and a JWT secret), written into ``workdir``."""
    tokens = workdir / "tokens"
    tokens.write_text(f"{TOKEN} {TENANT}\n")
    jwt_secret = workdir / "jwt-secret"
    jwt_secret.write_bytes(b"a-jwt-secret-for-tests-only-0123456789")
    return ["--auth-tokens", str(tokens), "--auth-jwt-secret", str(jwt_secret)]


async def wait_serving(addresses: Iterable[str], timeout: float = 10.0,
                       tls: Tls | None = None) -> None:
    """Wait until every address answers its health check with SERVING."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        async with open_channel(address, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{address} is not SERVING after {timeout}s")
                await asyncio.sleep(0.05)


BACKGROUND = ["nice", "-n", "10"]
"""Prefix for a test's CPU-heavy commands whose speed it does not judge (the
bench smoke run, pip installs): when tests run side by side, the cores go first
to those whose processes must answer within leases and timeouts."""


async def registration(etcd: str, cluster: str, node_id: str) -> NodeInfo | None:
    """What etcd holds under ``node_id``'s key in ``cluster`` now (None: nothing)."""
    client = client_for(etcd)
    try:
        found = await asyncio.wait_for(client.get(node_key(cluster, node_id)), 10)
    finally:
        await client.close()
    return None if found is None else NodeInfo.from_json(found.value)


@dataclass
class Writer:
    """Concurrent Set loops on fresh keys; remembers every acknowledged write, every
    error, and the longest a loop went from a failed call to its next success."""

    mesh: Mesh
    tasks: int = 4
    prefix: str = "w"
    pause: float = 0.005
    """Seconds between a loop's calls: a steady load (hundreds of writes a second,
    four always in flight or about to be) rather than all the CPU it can take,
    which only slows the other tests running beside it."""
    acked: dict[str, bytes] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    longest_outage: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _acked_more: asyncio.Event = field(default_factory=asyncio.Event)
    _running: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._running = [asyncio.create_task(self._loop(i)) for i in range(self.tasks)]

    async def _loop(self, worker: int) -> None:
        failing_since: float | None = None
        for n in itertools.count():
            if self._stop.is_set():
                return
            key, value = f"{self.prefix}{worker}-{n}", f"v{worker}-{n}".encode()
            try:
                await self.mesh.cache.set(key, value)
            except MeshError as exc:
                self.errors.append(exc)
                failing_since = failing_since or time.monotonic()
                await asyncio.sleep(0.05)
                continue
            self.acked[key] = value
            self._acked_more.set()
            if failing_since is not None:
                self.longest_outage = max(self.longest_outage,
                                          time.monotonic() - failing_since)
                failing_since = None
            if self.pause:
                await asyncio.sleep(self.pause)

    async def acked_at_least(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` writes are acknowledged: a test's load phase is
        counted, not timed, so a loaded machine makes it longer, not thinner."""
        async with asyncio.timeout(timeout):
            while len(self.acked) < count:
                self._acked_more.clear()
                await self._acked_more.wait()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._running)

    async def lost(self) -> list[str]:
        """Acknowledged keys that do not read back with their value."""
        keys = sorted(self.acked)
        values = await self.mesh.cache.mget(keys) if keys else []
        return [k for k, v in zip(keys, values, strict=True) if v != self.acked[k]]


class Secured(Protocol):
    """A running mesh whose cluster secret the tests know (LocalMesh, HostedMesh)."""

    @property
    def secret_file(self) -> Path | None: ...

    @property
    def cluster(self) -> str: ...


def peer_signer(local: Secured, kind: str = COORDINATOR, peer_id: str = "tests"
                ) -> PeerSigner:
    """A peer credential for ``local``'s cluster (a coordinator's, by default: it
    may ask positions, not replicate)."""
    secret = local.secret_file
    return PeerSigner(PeerKey.from_file(secret, local.cluster) if secret else None,
                      kind, peer_id)


async def positions(table: RoutingTable, group_id: int, local: Secured
                    ) -> dict[str, tuple[int, int]]:
    """Each member's applied (epoch, seq) for a group, asked on their peer ports."""
    group = table.groups[group_id]
    signer = peer_signer(local)
    result: dict[str, tuple[int, int]] = {}
    for node_id in group.members:
        async with grpc.aio.insecure_channel(table.peer_addresses[node_id]) as channel:
            stub = rpb_grpc.ReplicationServiceStub(channel)
            with contextlib.suppress(grpc.aio.AioRpcError):
                p = await stub.GetPosition(rpb.GetPositionRequest(group_id=group_id), timeout=2,
                                           metadata=signer.metadata())
                result[node_id] = (p.applied_epoch, p.applied_seq)
    return result


async def wait_converged(table: RoutingTable, local: Secured, timeout: float = 10.0
                         ) -> None:
    """Every member of every group reaches the same applied position (no divergence,
    no lag) once writes have stopped."""
    deadline = time.monotonic() + timeout
    pending = set(table.groups)
    while pending and time.monotonic() < deadline:
        for group_id in list(pending):
            found = await positions(table, group_id, local)
            if len(found) == len(table.groups[group_id].members) \
                    and len(set(found.values())) == 1:
                pending.discard(group_id)
        if pending:
            await asyncio.sleep(0.2)
    assert not pending, f"groups whose members disagree: {sorted(pending)[:10]}"


def error_details(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str], dict[str, str]]:
    """(reason, ErrorInfo metadata, BadRequest violations) of a rich error."""
    reason, metadata, violations = "", {}, {}
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
    return reason, metadata, violations


class Worker:
    """A test client in its own process (``python -m tests.<name>_worker``), read by line."""

    def __init__(self, process: asyncio.subprocess.Process, errors: Path) -> None:
        self.process = process
        self.errors = errors

    async def line(self, prefix: str, timeout: float = 30.0) -> str:
        """The next stdout line starting with ``prefix`` (others are skipped)."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    tail = self.errors.read_text()[-3000:]
                    raise AssertionError(f"worker exited ({await self.process.wait()}) "
                                         f"before printing {prefix!r}:\n{tail}")
                text = raw.decode().strip()
                if text.startswith(prefix):
                    return text

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)


@asynccontextmanager
async def workers(local: LocalMesh, tmp_path: Path, module: str) -> AsyncIterator[Any]:
    """``start(*args) -> Worker`` runs ``python -m <module> *args`` against ``local``
    (MESH_ETCD_ENDPOINTS, MESH_CLUSTER); every worker is killed on the way out."""
    started: list[Worker] = []
    env = {**os.environ, "MESH_ETCD_ENDPOINTS": local.etcd_endpoint,
           "MESH_CLUSTER": local.cluster, "PYTHONUNBUFFERED": "1"}

    async def start(*args: str) -> Worker:
        path = tmp_path / f"worker-{len(started)}.err"
        with path.open("w") as errors:
            process = await asyncio.create_subprocess_exec(
                *_with_parent_death([sys.executable, "-m", module, *args]),
                cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=errors)
        worker = Worker(process, path)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            if worker.process.returncode is None:
                worker.process.kill()
            await worker.process.wait()


class LiveNodes:
    """Plaintext channels to a mesh's live nodes, one per address."""

    def __init__(self, local: LocalMesh) -> None:
        self.local = local
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str | None = None) -> grpc.aio.Channel:
        """To ``address``, else to a live node at random (one that does not lead
        the call's key forwards it)."""
        if address is None:
            address = random.choice([n.address for n in self.local.nodes if n.child.alive()])
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
