"""Server-streaming RPCs as Server-Sent Events.

One SSE event per stream message (``data:`` its JSON, as unary answers are
written), with an ``id:`` (a cursor, `gateway.positions`) on every message that
moves the stream on: an event subscription's ids are event versions, a
notification subscription's a compact JSON of its channels' offsets and
epochs; a reconnecting ``EventSource`` sends the last one as
``Last-Event-ID`` and the request resumes after it, so nothing is missed or
repeated. A cache watch's ids are its ``seq`` (a watch starts "from now on":
a new one cannot resume, and a jump in seq shows a gap).

A stream never stalls silently (`gateway.streams`):

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

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message

from clients.errors import MeshError, UnavailableError
from gateway.errors import status_json
from gateway.positions import Position, position_for
from gateway.streams import ask_heartbeats, is_heartbeat, read
from gateway.transcode import to_json
from gateway.upstream import Stream

__all__ = ["events", "prepare"]


def prepare(method: str, request: message.Message, last_event_id: str) -> Position:
    """Ask the node for heartbeats and resume after ``Last-Event-ID``: the stream's
    position. CursorError for an id this stream did not send."""
    ask_heartbeats(request)
    position = position_for(method)
    position.restore(last_event_id)
    position.apply(request)
    return position


def _frame(data: Any, event: str = "", event_id: str = "") -> bytes:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


async def events(position: Position, stream: Stream, keepalive: float,
                 on_end: Callable[[], None]) -> AsyncIterator[bytes]:
    """The SSE body of an open stream; see the module doc. ``on_end`` runs once
    the stream is over, whichever way."""
    messages = read(stream, keepalive)
    try:
        async for item in messages:
            if item is None:
                yield b": keepalive\n\n"
            elif is_heartbeat(item):
                yield b": heartbeat\n\n"
            else:
                moved = position.see(item)
                yield _frame(to_json(item), event_id=position.cursor() if moved else "")
        yield _frame({"last_event_id": position.cursor()}, event="end")
    except MeshError as error:
        yield _frame(error_data(error, position.cursor()), event="error")
    finally:
        await messages.aclose()
        stream.release()
        on_end()


def error_data(error: BaseException, cursor: str) -> dict[str, Any]:
    """A failed stream's google.rpc.Status JSON, with where it stood."""
    if not isinstance(error, MeshError):
        error = UnavailableError(f"the stream failed: {type(error).__name__}",
                                 code=grpc.StatusCode.UNAVAILABLE)
    data = status_json(error)
    data["last_event_id"] = cursor
    return data
