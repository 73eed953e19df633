"""Mutual TLS between clients, nodes and coordinators, with certificates made here.

openssl makes a CA, one certificate for the mesh's processes (they present it
both as servers and when calling each other) and one for a client; a second
CA signs an impostor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import Mesh, UnavailableError
from common.auth import bearer
from common.localmesh import Etcd
from common.tls import Tls, open_channel
from mesh.cache.v1 import cache_pb2, cache_pb2_grpc
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.replication.v1 import replication_pb2_grpc as rpb_grpc
from tests.certs import make_ca, make_cert
from tests.cluster import TOKEN, auth_flags
from tests.conftest import non_owner


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Tls]]:
    cwd = tmp_path_factory.mktemp("certs")
    make_ca(cwd, "ca")
    make_ca(cwd, "other-ca")
    yield {"mesh": make_cert(cwd, "mesh", "ca"), "client": make_cert(cwd, "client", "ca"),
           "impostor": make_cert(cwd, "impostor", "other-ca")}


def _flags(tls: Tls) -> list[str]:
    return ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]


async def test_mutual_tls_across_the_mesh(
    local_mesh: Any, certs: dict[str, Tls], etcd: Etcd, cluster_name: str, tmp_path: Path
) -> None:
    mesh_tls = certs["mesh"]
    # Three nodes and a coordinator that only speak mutual TLS, to clients and to
    # each other (replication, forwarding, the coordinator's probes), with client
    # authentication on and the internal plane behind the cluster secret.
    auth = auth_flags(tmp_path)
    local = local_mesh(3, extra=[*_flags(mesh_tls), *auth],
                       coordinator_extra=[*_flags(mesh_tls), *auth], tls=mesh_tls)
    client = certs["client"]
    async with Mesh(etcd=etcd.endpoint, cluster=cluster_name, tls=client,
                    token=TOKEN) as mesh:
        await mesh.cache.set("tls:k", b"secret")
        assert await mesh.cache.get("tls:k") == b"secret"
        lease = await mesh.locks.acquire("tls:lock", ttl=10)
        await lease.release()

    # A plain stub on a node that does not own the key: forwarded over the
    # owner's peer port, under TLS, with this node's peer credential.
    async with open_channel(non_owner(local, "tls:k")[0], client) as channel:
        reply = await cache_pb2_grpc.CacheServiceStub(channel).Get(
            cache_pb2.GetRequest(key="tls:k"), timeout=5, metadata=(bearer(TOKEN),))
        assert reply.value == b"secret"
    # A certificate from the cluster's CA does not make a client a member: the
    # peer port still wants the credential only members can sign.
    async with open_channel(local.nodes[0].peer_address, client) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused_peer:
            await rpb_grpc.ReplicationServiceStub(channel).GetPosition(
                rpb.GetPositionRequest(group_id=1), timeout=5, metadata=(bearer(TOKEN),))
        assert refused_peer.value.code() == grpc.StatusCode.UNAUTHENTICATED

    address = local.nodes[0].address
    request = cache_pb2.GetRequest(key="tls:k")
    refused = {
        "plaintext": None,
        "no client certificate": Tls(ca=client.ca),
        "a certificate from another CA": certs["impostor"],
    }
    for why, tls in refused.items():
        async with open_channel(address, tls) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache_pb2_grpc.CacheServiceStub(channel).Get(request, timeout=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, why
    # The typed client says the same, within its deadline.
    async with Mesh(etcd=etcd.endpoint, cluster=cluster_name, timeout=2,
                    tls=Tls(ca=client.ca)) as anonymous:
        with pytest.raises(UnavailableError):
            await anonymous.cache.get("tls:k")
