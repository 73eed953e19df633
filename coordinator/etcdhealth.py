"""etcd health for Status: each endpoint's own status, and whether a quorum answers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import aetcd
from aetcd import rpc

from common.etcd import EtcdAccess, client_for
from mesh.admin.v1 import admin_pb2

CALL_TIMEOUT = 1.0


class EtcdHealthCheck:
    """Asks every configured endpoint, each with a short deadline (and the same TLS
    settings and credentials)."""

    def __init__(self, etcd: EtcdAccess, quorum_key: bytes) -> None:
        self._access = etcd
        self._endpoints = etcd.endpoints
        self._quorum_key = quorum_key
        self._clients: dict[str, aetcd.Client] = {}

    async def check(self) -> admin_pb2.EtcdHealth:
        results = await asyncio.gather(*(self._endpoint(e) for e in self._endpoints))
        # A linearizable read needs the raft quorum: if it works, reads and writes do.
        quorum = await self._quorum([r.endpoint for r in results if r.healthy])
        return admin_pb2.EtcdHealth(healthy=quorum, endpoints=results)

    def _client(self, endpoint: str) -> aetcd.Client:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = client_for(
                dataclasses.replace(self._access, endpoints=(endpoint,)))
        return client

    async def _endpoint(self, endpoint: str) -> admin_pb2.EtcdEndpoint:
        try:
            client = self._client(endpoint)
            await asyncio.wait_for(client.connect(), CALL_TIMEOUT)
            await client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=CALL_TIMEOUT, metadata=client.metadata)
        except Exception as exc:
            return admin_pb2.EtcdEndpoint(endpoint=endpoint, healthy=False,
                                          error=str(exc) or type(exc).__name__)
        return admin_pb2.EtcdEndpoint(endpoint=endpoint, healthy=True)

    async def _quorum(self, answering: list[str]) -> bool:
        """Whether a linearizable read works through one of the ``answering`` members
        (any will do: with the first member down, the others may still have quorum)."""
        for endpoint in answering:
            try:
                await asyncio.wait_for(self._client(endpoint).get(self._quorum_key),
                                       CALL_TIMEOUT)
            except Exception:
                continue
            return True
        return False

    async def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
