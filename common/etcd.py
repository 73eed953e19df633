"""Connecting to etcd with aetcd, with a deadline on every call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aetcd
import aetcd.utils
from aetcd import rpc

# Every etcd call made through a client from here is bounded by this many seconds.
CALL_TIMEOUT = 3


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
    return aetcd.Client(host=host, port=port, timeout=timeout)


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
