"""Which nodes are up: a live view of etcd's membership, or a fixed list.

Routing comes from the cluster map (``clients.router``); membership is what
``stats``, prefix watches and ``meshctl status`` fan out to, the nodes tried
while the map names no owner, and (with the map) which channels to keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence

import aetcd

from common.etcd import watch_prefix
from common.membership import NodeInfo, nodes_prefix

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
        services = ("cache", "lock", "events", "scheduler")
        self._replace({a: NodeInfo(node_id=a, address=a, services=services, version="")
                       for a in self._addresses})


class EtcdDirectory(NodeDirectory):
    """Follows ``/<cluster>/nodes/`` in etcd: a full read, then a watch from that revision.

    If the watch breaks (etcd restarted, network blip) it reads again and
    re-watches, with backoff, for as long as the directory is open.
    """

    def __init__(self, etcd: aetcd.Client, cluster: str) -> None:
        """``etcd``: a client the caller owns (and closes)."""
        super().__init__()
        self._etcd = etcd
        self._prefix = nodes_prefix(cluster)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        revision = await self._read()
        self._task = asyncio.create_task(self._follow(revision), name="mesh-directory")

    async def refresh(self) -> None:
        with contextlib.suppress(Exception):
            await self._read()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _read(self) -> int:
        result = await self._etcd.get_prefix(self._prefix)
        nodes = {}
        for kv in result:
            try:
                info = NodeInfo.from_json(kv.value)
            except (ValueError, KeyError) as exc:
                log.warning("ignoring malformed node record %r: %s", kv.key, exc)
                continue
            nodes[info.node_id] = info
        self._replace(nodes)
        return int(result.header.revision) if result.header is not None else 0

    async def _follow(self, revision: int) -> None:
        delay = 0.1
        while True:
            try:
                changes = watch_prefix(self._etcd, self._prefix, revision + 1)
                async for kind, key, value, mod_revision in changes:
                    delay = 0.1
                    revision = max(revision, mod_revision)
                    nodes = dict(self.nodes)
                    node_id = key[len(self._prefix):].decode()
                    if kind == "PUT":
                        nodes[node_id] = NodeInfo.from_json(value)
                    else:
                        nodes.pop(node_id, None)
                    self._replace(nodes)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("membership watch broke (%s); re-reading", exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
            with contextlib.suppress(Exception):
                revision = await self._read()
