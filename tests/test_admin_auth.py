"""The coordinator's AdminService with authentication on, on real processes.

Reads take any valid token, the mutations (Drain, Rebalance, RecoverLostGroups)
an admin one; health stays open. ``meshctl`` sends ``$MESH_TOKEN`` on every call.
One cluster (a coordinator, three nodes) serves the whole module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.errors import from_rpc_error
from common.localmesh import Etcd, LocalMesh
from coordinator.client import admin_client
from mesh.admin.v1 import admin_pb2
from tests.conftest import module_cluster

SECRET = b"admin-auth-test-secret-0123456789"
ADMIN, CLIENT = "t-admin", "t-client"
MESHCTL = [sys.executable, "-m", "meshctl"]


def _jwt(**claims: Any) -> str:
    claims.setdefault("tenant", "ops")
    claims.setdefault("exp", int(time.time()) + 300)
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def secured(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """A coordinator and three nodes, all authenticating (static tokens and JWTs)."""
    def flags(workdir: Path) -> list[str]:
        tokens = workdir / "tokens"
        tokens.write_text(f"{ADMIN} ops admin\n{CLIENT} acme\n")
        secret = workdir / "jwt-secret"
        secret.write_bytes(SECRET)
        return ["--auth-tokens", str(tokens), "--auth-jwt-secret", str(secret)]

    yield from module_cluster(etcd, tmp_path_factory, "adminauth", 3, flags, coordinator=True)


async def _outcome(local: LocalMesh, token: str,
                   call: Callable[[Any], Awaitable[Any]]) -> str:
    """'OK', or the gRPC code and ErrorInfo reason the call ended with."""
    async with admin_client(local.etcd_endpoint, local.cluster, token=token) as stub:
        try:
            await call(stub)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name} {from_rpc_error(exc).reason}"
    return "OK"


async def _drain(stub: Any) -> Any:
    # An unknown node: the service's own answer (NOT_FOUND) shows the call got
    # past admission without draining anything.
    return await stub.Drain(admin_pb2.DrainRequest(node_id="no-such-node"), timeout=5)


async def _rebalance(stub: Any) -> Any:
    return await stub.Rebalance(admin_pb2.RebalanceRequest(), timeout=5)


async def _recover(stub: Any) -> Any:
    return await stub.RecoverLostGroups(admin_pb2.RecoverLostGroupsRequest(), timeout=5)


async def test_mutations_need_an_admin_token(secured: LocalMesh) -> None:
    for call in (_drain, _rebalance, _recover):
        assert await _outcome(secured, "", call) == "UNAUTHENTICATED TOKEN_MISSING"
        assert await _outcome(secured, "forged", call) == "UNAUTHENTICATED TOKEN_INVALID"
        assert await _outcome(secured, CLIENT, call) == "PERMISSION_DENIED ADMIN_REQUIRED"
        assert await _outcome(secured, _jwt(role="client"), call) \
            == "PERMISSION_DENIED ADMIN_REQUIRED"
    assert await _outcome(secured, ADMIN, _drain) == "NOT_FOUND NODE_NOT_FOUND"
    assert await _outcome(secured, ADMIN, _rebalance) == "OK"
    assert await _outcome(secured, ADMIN, _recover) == "OK"
    assert await _outcome(secured, _jwt(role="admin"), _rebalance) == "OK"


async def test_reads_take_any_valid_token_and_health_stays_open(secured: LocalMesh) -> None:
    async def reads(stub: Any) -> None:
        topology = await stub.GetTopology(admin_pb2.GetTopologyRequest(), timeout=5)
        assert len(topology.cluster_map.nodes) == 3
        assert len((await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)).nodes) == 3
        assert (await stub.Status(admin_pb2.StatusRequest(), timeout=5)).nodes == 3
        async for update in stub.WatchTopology(admin_pb2.WatchTopologyRequest(), timeout=5):
            assert update.cluster_map.epoch > 0
            break

    assert await _outcome(secured, CLIENT, reads) == "OK"
    assert await _outcome(secured, _jwt(), reads) == "OK"
    assert await _outcome(secured, "", reads) == "UNAUTHENTICATED TOKEN_MISSING"
    assert await _outcome(secured, _jwt(exp=int(time.time()) - 60), reads) \
        == "UNAUTHENTICATED TOKEN_EXPIRED"
    async with grpc.aio.insecure_channel(secured.coordinators[0].address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _meshctl(local: LocalMesh, token: str | None, *args: str
             ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESH_TOKEN"}
    if token is not None:
        env["MESH_TOKEN"] = token
    return subprocess.run(
        [*MESHCTL, "--etcd", local.etcd_endpoint, "--cluster", local.cluster, *args],
        capture_output=True, text=True, timeout=30, env=env)


def test_meshctl_sends_mesh_token(secured: LocalMesh) -> None:
    # Last in the module: it really drains a node.
    node = secured.nodes[-1].node_id
    bare = _meshctl(secured, None, "drain", node, "--no-wait")
    assert bare.returncode == 1  # the cluster answered no
    assert "UnauthenticatedError" in bare.stderr and "MESH_TOKEN" in bare.stderr
    client = _meshctl(secured, CLIENT, "drain", node, "--no-wait")
    assert client.returncode == 1 and "PermissionDeniedError" in client.stderr, client.stderr
    admin = _meshctl(secured, ADMIN, "drain", node, "--no-wait")
    assert admin.returncode == 0, admin.stderr
    assert f"draining {node} since map epoch" in admin.stdout
    # The service subcommands send it to the nodes too.
    cache = _meshctl(secured, CLIENT, "cache", "set", "admin-auth:k", "v")
    assert cache.returncode == 0 and cache.stdout.startswith("OK version"), cache.stderr
    assert _meshctl(secured, None, "cache", "get", "admin-auth:k").returncode == 1
