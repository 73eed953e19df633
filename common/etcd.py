"""Connecting to etcd with aetcd, with a deadline on every call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable

import aetcd
import aetcd.utils
from aetcd import rpc

log = logging.getLogger(__name__)

# Every etcd call made through a client from here is bounded by this many seconds.
CALL_TIMEOUT = 3


# Reconnect fast once etcd is back: gRPC's default backoff grows to minutes, and
# a node that reconnects later than its lease TTL after an etcd restart loses
# its lease (and its groups fail over) for nothing.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
}


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (or ``http://host:port``) -> ``(host, port)``."""
    endpoint = endpoint.removeprefix("http://")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


def client_for(endpoints: tuple[str, ...] | list[str], timeout: int = CALL_TIMEOUT) -> aetcd.Client:
    """An unconnected aetcd client for the first endpoint.

    aetcd speaks to one endpoint; gRPC reconnects to it by itself when etcd
    restarts, which is what a development mesh needs. Production setups put the
    etcd cluster behind one address (a load balancer or DNS name).
    """
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    host, port = split_endpoint(endpoints[0])
    return aetcd.Client(host=host, port=port, timeout=timeout, options=CHANNEL_OPTIONS)


class WatchBroken(Exception):
    """The watch ended (compacted revision, cancelled by etcd): read again and re-watch."""


async def watch_prefix(
    client: aetcd.Client, prefix: bytes, start_revision: int
) -> AsyncIterator[tuple[str, bytes, bytes, int]]:
    """Yield ``(kind, key, value, mod_revision)`` for changes under ``prefix``.

    One raw etcd Watch stream per call, rather than aetcd's shared watcher,
    whose internal lock can deadlock when a pending watch is cancelled. Here
    cancelling the consumer cancels the gRPC call, and that is all.
    """
    await client.connect()
    stub = rpc.WatchStub(client.channel)
    create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
        key=prefix, range_end=aetcd.utils.prefix_range_end(prefix),
        start_revision=start_revision))
    done = asyncio.Event()

    async def requests() -> AsyncIterator[rpc.WatchRequest]:
        yield create
        await done.wait()  # keep our side open: a half-close may end the watch

    call = stub.Watch(requests(), metadata=client.metadata)
    try:
        async for response in call:
            if response.compact_revision or response.canceled:
                raise WatchBroken(response.cancel_reason or "revision compacted")
            for event in response.events:
                kind = "DELETE" if event.type == rpc.Event.EventType.DELETE else "PUT"
                yield kind, event.kv.key, event.kv.value, event.kv.mod_revision
    finally:
        done.set()
        call.cancel()


class PrefixFollower:
    """Keeps a local view of an etcd prefix: one full read, then a watch from its
    revision. If the watch breaks (etcd restarted, compaction, network) it reads
    again and re-watches, with backoff, for as long as it is open.

    ``on_read(kvs)`` gets every ``(key, value, create_revision)`` of a full read
    (the view is replaced); ``on_event(kind, key, value, mod_revision)`` each later
    change ("PUT" or "DELETE"). Both run on the event loop and must not block.
    """

    def __init__(
        self, client: aetcd.Client, prefix: bytes,
        on_read: Callable[[list[tuple[bytes, bytes, int]]], None],
        on_event: Callable[[str, bytes, bytes, int], None],
        name: str = "etcd-follower",
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._on_read = on_read
        self._on_event = on_event
        self._name = name
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the prefix (raising if etcd is unreachable), then follow it."""
        revision = await self._read()
        self._task = asyncio.create_task(self._follow(revision), name=self._name)

    async def refresh(self) -> None:
        """Read the prefix again now; errors are swallowed (the watch keeps trying)."""
        with contextlib.suppress(Exception):
            await self._read()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _read(self) -> int:
        result = await asyncio.wait_for(self._client.get_prefix(self._prefix), CALL_TIMEOUT)
        self._on_read([(kv.key, kv.value, int(kv.create_revision)) for kv in result])
        return int(result.header.revision) if result.header is not None else 0

    async def _follow(self, revision: int) -> None:
        delay = 0.1
        while True:
            try:
                async for kind, key, value, mod_revision in watch_prefix(
                        self._client, self._prefix, revision + 1):
                    delay = 0.1
                    revision = max(revision, mod_revision)
                    self._on_event(kind, key, value, mod_revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("%s: watch broke (%s); re-reading", self._name, exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
            with contextlib.suppress(Exception):
                revision = await self._read()
