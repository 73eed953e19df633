"""Server-streaming RPCs as Server-Sent Events.

One SSE event per stream message (``data:`` its JSON, as unary answers are
written), with an ``id:`` to resume from where the method has one: an event
subscription's ids are event versions, and a reconnecting ``EventSource``
sends the last one as ``Last-Event-ID``, which becomes ``after_version``, so
nothing is missed or repeated; a cache watch's ids are its ``seq`` (a watch
starts "from now on": a new one cannot resume, and a jump in seq shows a gap).

A stream never stalls silently:

- the node's own heartbeats (asked for on every stream) become SSE comments
  (``: heartbeat``), and the gateway writes ``: keepalive`` after
  ``keepalive`` seconds with nothing to send, so proxies keep the connection;
- if the node goes quiet for three of its heartbeat intervals, or its stream
  fails (the node died, lost the slot, refused), the gateway sends ``event:
  error`` whose data is the google.rpc.Status JSON plus ``last_event_id``,
  then ends the response: the client reconnects (with ``Last-Event-ID``);
- a stream the node closes normally ends with ``event: end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2, message

from clients.errors import MeshError, UnavailableError, from_rpc_error
from gateway.errors import status_json
from gateway.transcode import to_json
from gateway.upstream import Stream

__all__ = ["RESUMES", "Resume", "events", "prepare"]

DEAD_AFTER_HEARTBEATS = 3
"""Heartbeat intervals of silence after which the node's stream counts as dead."""


@dataclass(frozen=True)
class Resume:
    """How a method's messages are numbered and how a request resumes after one."""

    id_of: Callable[[message.Message], str]
    """The SSE id of a message ('' for none)."""
    field: str = ""
    """The request field ``Last-Event-ID`` sets (empty: the method cannot resume)."""


def _get(m: message.Message, name: str) -> Any:
    """A field of a message known only by its descriptor."""
    return getattr(m, name)


def _event_version(response: message.Message) -> str:
    if response.WhichOneof("content") == "event":
        return str(_get(response, "event").version)
    return ""


def _seq(response: message.Message) -> str:
    return str(_get(response, "seq"))


RESUMES: dict[str, Resume] = {
    "mesh.events.v1.EventsService.Subscribe": Resume(_event_version, "after_version"),
    "mesh.cache.v1.CacheService.Watch": Resume(_seq),
}
"""Per streaming method (full name); one missing here streams without ids."""


def prepare(method: str, request: message.Message, last_event_id: str) -> None:
    """Ask the node for heartbeats (its own interval) and apply ``Last-Event-ID``."""
    fields = request.DESCRIPTOR.fields_by_name
    if "heartbeat_interval" in fields and not request.HasField("heartbeat_interval"):
        # Zero: the node's setting. Without it, a Watch would send none.
        _get(request, "heartbeat_interval").CopyFrom(duration_pb2.Duration())
    resume = RESUMES.get(method)
    if resume is not None and resume.field and last_event_id.isdigit():
        setattr(request, resume.field, int(last_event_id))


def _heartbeat_interval(first: message.Message) -> float:
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


def _is_heartbeat(response: message.Message) -> bool:
    fields = response.DESCRIPTOR.fields_by_name
    return "heartbeat" in fields and response.HasField("heartbeat")


def _frame(data: Any, event: str = "", event_id: str = "") -> bytes:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


async def events(method: str, stream: Stream, keepalive: float,
                 on_end: Callable[[], None]) -> AsyncIterator[bytes]:
    """The SSE body of an open stream; see the module doc. ``on_end`` runs once
    the stream is over, whichever way."""
    resume = RESUMES.get(method)
    interval = _heartbeat_interval(stream.first)
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

    reader = asyncio.get_running_loop().create_task(pump())
    last_id = ""
    loop = asyncio.get_running_loop()
    heard = written = loop.time()
    # Wake often enough to notice a silent node and to keep the connection alive.
    tick = min(keepalive, interval) if interval > 0 else keepalive
    try:
        item: message.Message | BaseException | None = stream.first
        while True:
            if isinstance(item, message.Message):
                heard = written = loop.time()
                if _is_heartbeat(item):
                    yield b": heartbeat\n\n"
                else:
                    event_id = resume.id_of(item) if resume is not None else ""
                    last_id = event_id or last_id
                    yield _frame(to_json(item), event_id=event_id)
            elif item is None:
                yield _frame({"last_event_id": last_id}, event="end")
                return
            else:
                error = from_rpc_error(item, stream.address) \
                    if isinstance(item, grpc.aio.AioRpcError) else item
                yield _frame(_error_data(error, last_id), event="error")
                return
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), tick)
                    break
                except TimeoutError:
                    now = loop.time()
                    if dead_after is not None and now - heard > dead_after:
                        silent = UnavailableError(
                            f"the node sent nothing for {dead_after:g} s (3 heartbeat "
                            "intervals): reconnect", code=grpc.StatusCode.UNAVAILABLE,
                            reason="STREAM_SILENT")
                        yield _frame(_error_data(silent, last_id), event="error")
                        return
                    if now - written >= keepalive:
                        written = now
                        yield b": keepalive\n\n"
    finally:
        stream.call.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        stream.release()
        on_end()


def _error_data(error: BaseException, last_id: str) -> dict[str, Any]:
    if not isinstance(error, MeshError):
        error = UnavailableError(f"the stream failed: {type(error).__name__}",
                                 code=grpc.StatusCode.UNAVAILABLE)
    data = status_json(error)
    data["last_event_id"] = last_id
    return data
