"""The registered nodes (``/<cluster>/nodes/``), followed by a read then a watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import aetcd

from common.etcd import watch_prefix
from common.membership import NodeInfo, nodes_prefix

log = logging.getLogger(__name__)

CALL_TIMEOUT = 2.0


class NodeRegistry:
    """``nodes``: node_id -> NodeInfo for every live registration; listeners fire on change.

    If the watch breaks (etcd restarted, compaction) it reads again and
    re-watches with backoff, for as long as it is open.
    """

    def __init__(self, etcd: aetcd.Client, cluster: str) -> None:
        self._etcd = etcd
        self._prefix = nodes_prefix(cluster)
        self.nodes: dict[str, NodeInfo] = {}
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        """Read the registrations (raising if etcd is unreachable), then follow them."""
        revision = await self._read()
        self._task = asyncio.create_task(self._follow(revision), name="node-registry")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def _replace(self, nodes: dict[str, NodeInfo]) -> None:
        if nodes != self.nodes:
            self.nodes = nodes
            for listener in self._listeners:
                listener()

    async def _read(self) -> int:
        result = await asyncio.wait_for(self._etcd.get_prefix(self._prefix), CALL_TIMEOUT)
        nodes = {}
        for kv in result:
            info = self._parse(kv.key, kv.value)
            if info is not None:
                nodes[info.node_id] = info
        self._replace(nodes)
        return int(result.header.revision)

    def _parse(self, key: bytes, value: bytes) -> NodeInfo | None:
        try:
            return NodeInfo.from_json(value)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed node record %r: %s", key, exc)
            return None

    async def _follow(self, revision: int) -> None:
        delay = 0.1
        while True:
            try:
                async for kind, key, value, mod_revision in watch_prefix(
                        self._etcd, self._prefix, revision + 1):
                    delay = 0.1
                    revision = max(revision, mod_revision)
                    nodes = dict(self.nodes)
                    node_id = key[len(self._prefix):].decode()
                    info = self._parse(key, value) if kind == "PUT" else None
                    if info is None:
                        nodes.pop(node_id, None)
                    else:
                        nodes[node_id] = info
                    self._replace(nodes)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("membership watch broke (%s); re-reading", exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
            with contextlib.suppress(Exception):
                revision = await self._read()
