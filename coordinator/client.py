"""Finding the leading coordinator's AdminService through etcd (for meshctl and tools)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence

from clients.errors import UnavailableError
from common.auth import bearer_interceptors
from common.clustermap import leader_key
from common.etcd import EtcdAccess, client_for
from common.tls import Tls, open_channel
from coordinator.election import LeaderInfo
from mesh.admin.v1 import admin_pb2_grpc

ETCD_TIMEOUT = 2.0


EtcdTarget = str | Sequence[str] | EtcdAccess
"""etcd's endpoints (TLS and credentials then come from the ``MESH_ETCD_*``
environment variables), or an EtcdAccess."""


def _access(etcd: EtcdTarget) -> EtcdAccess:
    return etcd if isinstance(etcd, EtcdAccess) else EtcdAccess.from_env(etcd)


async def find_leader(etcd_endpoints: EtcdTarget, cluster: str,
                      timeout: float = ETCD_TIMEOUT) -> LeaderInfo | None:
    """The leader key's content, or None when no coordinator leads."""
    etcd = client_for(_access(etcd_endpoints))
    try:
        kv = await asyncio.wait_for(etcd.get(leader_key(cluster)), timeout)
    except Exception as exc:
        raise UnavailableError(f"cannot read the leader key from etcd: {exc!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            await etcd.close()
    return None if kv is None else LeaderInfo.from_json(kv.value, kv.create_revision)


def _token(token: str | None) -> str:
    return token if token is not None else os.environ.get("MESH_TOKEN", "")


@contextlib.asynccontextmanager
async def admin_client(etcd_endpoints: EtcdTarget, cluster: str,
                       timeout: float = ETCD_TIMEOUT, tls: Tls | None = None,
                       token: str | None = None
                       ) -> AsyncIterator[admin_pb2_grpc.AdminServiceStub]:
    """A stub on the leader's channel, closed on exit; UnavailableError if nobody leads.
    ``tls`` defaults to the ``MESH_TLS_*`` environment variables; ``token`` (default
    ``$MESH_TOKEN``) is sent as ``authorization: Bearer`` on every call."""
    leader = await find_leader(etcd_endpoints, cluster, timeout)
    if leader is None or not leader.address:
        raise UnavailableError(f"no coordinator leads cluster {cluster!r}")
    async with open_channel(leader.address, tls or Tls.from_env(),
                            interceptors=bearer_interceptors(_token(token))) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


async def admin_stub(etcd_endpoints: EtcdTarget, cluster: str,
                     timeout: float = ETCD_TIMEOUT, tls: Tls | None = None,
                     token: str | None = None) -> admin_pb2_grpc.AdminServiceStub:
    """A stub on a new channel to the leader (the channel lives as long as the stub);
    prefer `admin_client`, which closes it. ``tls`` and ``token`` as there."""
    leader = await find_leader(etcd_endpoints, cluster, timeout)
    if leader is None or not leader.address:
        raise UnavailableError(f"no coordinator leads cluster {cluster!r}")
    return admin_pb2_grpc.AdminServiceStub(open_channel(
        leader.address, tls or Tls.from_env(), interceptors=bearer_interceptors(_token(token))))
