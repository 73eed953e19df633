"""Reading a node's server stream so that it never stalls silently.

Both the Server-Sent Events responses and the WebSocket subscriptions read
upstream streams through `read`: it yields the stream's messages, and a
``None`` tick whenever ``tick`` seconds pass with nothing (the caller's chance
to write a keepalive); it ends when the node ends the stream and raises a
`MeshError` when the stream fails, or when the node, which promised a
heartbeat every interval in its first message, stays silent for
`DEAD_AFTER_HEARTBEATS` intervals (reason ``STREAM_SILENT``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from google.protobuf import duration_pb2, message

from clients.errors import UnavailableError, from_rpc_error
from gateway.upstream import Stream

__all__ = ["DEAD_AFTER_HEARTBEATS", "ask_heartbeats", "is_heartbeat", "read"]

DEAD_AFTER_HEARTBEATS = 3
"""Heartbeat intervals of silence after which the node's stream counts as dead."""


def _get(m: message.Message, name: str) -> Any:
    """A field of a message known only by its descriptor."""
    return getattr(m, name)


def ask_heartbeats(request: message.Message) -> None:
    """Ask the node for heartbeats at its own interval, unless the request says."""
    fields = request.DESCRIPTOR.fields_by_name
    if "heartbeat_interval" in fields and not request.HasField("heartbeat_interval"):
        # Zero: the node's setting. Without it, a Watch would send none.
        _get(request, "heartbeat_interval").CopyFrom(duration_pb2.Duration())


def heartbeat_interval(first: message.Message) -> float:
    """The interval the node promised in its first message (0: none), found on the
    message itself or on the part of its oneof that is set."""
    candidates = [first]
    for oneof in first.DESCRIPTOR.oneofs:
        name = first.WhichOneof(oneof.name)
        if name is not None:
            part = getattr(first, name)
            if isinstance(part, message.Message):
                candidates.append(part)
    for candidate in candidates:
        if "heartbeat_interval" in candidate.DESCRIPTOR.fields_by_name \
                and candidate.HasField("heartbeat_interval"):
            value = _get(candidate, "heartbeat_interval")
            return float(value.seconds + value.nanos / 1e9)
    return 0.0


def is_heartbeat(response: message.Message) -> bool:
    fields = response.DESCRIPTOR.fields_by_name
    return "heartbeat" in fields and response.HasField("heartbeat")


async def read(stream: Stream, tick: float) -> AsyncGenerator[message.Message | None, None]:
    """See the module doc. The caller closes the generator (``aclose``) to stop
    early; the gRPC call is cancelled either way. Does not release the stream."""
    interval = heartbeat_interval(stream.first)
    dead_after = interval * DEAD_AFTER_HEARTBEATS if interval > 0 else None
    queue: asyncio.Queue[message.Message | BaseException | None] = asyncio.Queue(64)

    async def pump() -> None:
        # A reader of its own: waiting on the queue with a timeout never
        # cancels the gRPC read (which would cancel the whole call).
        try:
            while True:
                item = await stream.call.read()
                if item is grpc.aio.EOF:
                    await queue.put(None)
                    return
                await queue.put(item)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)

    loop = asyncio.get_running_loop()
    reader = loop.create_task(pump())
    heard = loop.time()
    # Wake often enough to notice a silent node and to let the caller keep alive.
    tick = min(tick, interval) if interval > 0 else tick
    try:
        yield stream.first
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancel that lands as an item arrives, and this loop would go on.
                async with asyncio.timeout(tick):
                    item = await queue.get()
            except TimeoutError:
                if dead_after is not None and loop.time() - heard > dead_after:
                    silent = UnavailableError(
                        f"the node sent nothing for {dead_after:g} s (3 heartbeat "
                        "intervals)", code=grpc.StatusCode.UNAVAILABLE,
                        reason="STREAM_SILENT")
                    silent.address = stream.address
                    raise silent from None
                yield None
                continue
            if item is None:
                return
            if isinstance(item, grpc.aio.AioRpcError):
                raise from_rpc_error(item, stream.address) from None
            assert isinstance(item, message.Message)
            heard = loop.time()
            yield item
    finally:
        stream.call.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
