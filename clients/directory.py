"""Which nodes are up: a live view of etcd's membership, or a fixed list.

Routing comes from the cluster map (``clients.router``); membership is what
``stats``, prefix watches and ``meshctl status`` fan out to, the nodes tried
while the map names no owner, and (with the map) which channels to keep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aetcd

from common.membership import Membership, NodeInfo

log = logging.getLogger(__name__)


class NodeDirectory:
    """The set of live nodes, and a callback list fired when it changes."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeInfo] = {}
        self._listeners: list[Callable[[], None]] = []
        self.ready = asyncio.Event()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _replace(self, nodes: dict[str, NodeInfo]) -> None:
        if nodes != self.nodes:
            self.nodes = nodes
            for listener in self._listeners:
                listener()
        self.ready.set()

    def offering(self, service: str) -> list[NodeInfo]:
        return [n for n in self.nodes.values() if service in n.services]

    async def start(self) -> None:
        raise NotImplementedError

    async def refresh(self) -> None:
        """Re-read membership now (after a node looked unreachable)."""

    async def close(self) -> None:
        """Stop following membership."""


class StaticDirectory(NodeDirectory):
    """A fixed list of addresses; each is assumed to offer every service."""

    def __init__(self, addresses: Sequence[str]) -> None:
        super().__init__()
        self._addresses = list(addresses)

    async def start(self) -> None:
        services = ("cache", "lock", "events", "scheduler", "notify", "saga")
        self._replace({a: NodeInfo(node_id=a, address=a, services=services, version="")
                       for a in self._addresses})


class EtcdDirectory(NodeDirectory):
    """Follows ``/<cluster>/nodes/`` in etcd (`common.membership.Membership`)."""

    def __init__(self, etcd: aetcd.Client, cluster: str) -> None:
        """``etcd``: a client the caller owns (and closes)."""
        super().__init__()
        self._membership = Membership(etcd, cluster)
        self._membership.on_change(lambda: self._replace(self._membership.nodes))

    async def start(self) -> None:
        await self._membership.start()
        self._replace(self._membership.nodes)  # ready, even when nobody registered

    async def refresh(self) -> None:
        await self._membership.refresh()

    async def close(self) -> None:
        await self._membership.close()
