"""The asyncio client: ``async with Mesh(etcd="127.0.0.1:2379") as mesh: ...``."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from clients.cache import CacheClient
from clients.directory import EtcdDirectory, NodeDirectory, StaticDirectory
from clients.errors import NoNodesError
from clients.routing import SlotRouter
from common.membership import NodeInfo

DEFAULT_TIMEOUT = 5.0

S = TypeVar("S")

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 32 << 20),
    ("grpc.max_send_message_length", 32 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect quickly to a restarted node instead of waiting out a long backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class Mesh:
    """A connection to a Mesh cluster: membership, routing, one channel per node.

    Give ``etcd`` endpoints (default ``$MESH_ETCD_ENDPOINTS``, else
    ``127.0.0.1:2379``) to follow the cluster's membership, or ``addresses`` to
    talk to a fixed list of nodes. ``timeout`` is the default deadline of every
    call; each method also takes its own ``timeout=``.
    """

    def __init__(
        self,
        *,
        etcd: str | Sequence[str] | None = None,
        addresses: Sequence[str] | None = None,
        cluster: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.timeout = timeout
        self.cluster = cluster or os.environ.get("MESH_CLUSTER", "mesh")
        if addresses:
            self.directory: NodeDirectory = StaticDirectory(addresses)
        else:
            raw = etcd or os.environ.get("MESH_ETCD_ENDPOINTS", "127.0.0.1:2379")
            endpoints = raw.split(",") if isinstance(raw, str) else list(raw)
            self.directory = EtcdDirectory(endpoints, self.cluster)
        self._routers: dict[str, SlotRouter] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._stubs: dict[tuple[object, str], object] = {}
        self.directory.on_change(self._membership_changed)
        self.cache = CacheClient(self)

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Read membership; raises UnavailableError if etcd cannot be reached in time."""
        try:
            await asyncio.wait_for(self.directory.start(), self.timeout)
        except Exception as exc:
            await self.directory.close()
            raise NoNodesError(f"cannot read cluster membership: {exc}") from exc

    async def close(self) -> None:
        await self.directory.close()
        channels, self._channels = self._channels, {}
        self._stubs.clear()
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        for task in list(self._closing):
            task.cancel()  # _retire then closes its channel at once
        await asyncio.gather(*self._closing, return_exceptions=True)

    # -- used by the per-service clients -------------------------------------

    def nodes(self, service: str) -> list[NodeInfo]:
        return self.directory.offering(service)

    def route(self, service: str, key: str) -> NodeInfo:
        """The node that serves ``key`` for ``service``."""
        router = self._routers.get(service)
        if router is None:
            router = self._routers[service] = SlotRouter()
            router.update(self.directory.offering(service))
        node = router.node_for_key(key)
        if node is None:
            raise NoNodesError(f"no live node offers the {service} service")
        return node

    def channel(self, address: str) -> grpc.aio.Channel:
        """The one channel to ``address``, created on first use and reused after."""
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def stub(self, stub_class: Callable[[grpc.aio.Channel], S], address: str) -> S:
        """A generated stub bound to the one channel for ``address``."""
        key = (stub_class, address)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = stub_class(self.channel(address))
        return stub  # type: ignore[return-value]

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        try:
            await asyncio.sleep(self.timeout + 1.0)
        finally:
            await channel.close(grace=1.0)

    async def refresh(self, timeout: float | None = None) -> None:
        """Re-read membership now, giving up quietly after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.directory.refresh(), timeout or self.timeout)

    def _membership_changed(self) -> None:
        self._routers.clear()
        live = {n.address for n in self.directory.nodes.values()}
        for address in [a for a in self._channels if a not in live]:
            channel = self._channels.pop(address)
            for key in [k for k in self._stubs if k[1] == address]:
                del self._stubs[key]
            # Calls may still be on their way to it (a call object created just
            # before a close is cancelled, even with a grace period): retire the
            # channel only once every such call has passed its deadline.
            task = asyncio.get_running_loop().create_task(self._retire(channel))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
