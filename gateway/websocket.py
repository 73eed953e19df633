"""``/v1/ws``: cache watches, event subscriptions and notifications over one WebSocket.

Every frame is a JSON object with a ``type``. The client:

- ``{"type": "auth", "token": "..."}``: the bearer token, as the first message
  (or ``?token=`` in the URL; a browser cannot set headers on a WebSocket).
  It is passed to the nodes with every call, which check it and scope the
  subscriptions to its tenant, as for any call. Without one (auth off), any
  other first message is taken as it is.
- ``{"type": "subscribe", "id": "s1", "rpc": "notify.Subscribe", "request":
  {...}, "cursor": "..."}``: open a subscription. ``rpc`` is one of the
  streaming calls (``events.Subscribe``, ``notify.Subscribe``, ``cache.Watch``),
  ``request`` its request in the same JSON as the HTTP routes (proto or
  lowerCamel names), ``id`` the client's name for it (1 to 128 characters,
  unique on the socket), ``cursor`` (optional) the last cursor received, to
  resume after it on a new socket.
- ``{"type": "unsubscribe", "id": "s1"}``; ``{"type": "ping"}`` (answered
  ``{"type": "pong"}``).

The gateway:

- ``{"type": "welcome", "heartbeat": 15}``: after the first message (or at
  once with ``?token=``): the socket is ready; a frame comes at least every
  ``heartbeat`` seconds (``{"type": "heartbeat"}`` when nothing else), so a
  client that hears nothing for a few of them reconnects.
- ``{"type": "message", "id": "s1", "message": {...}, "cursor": "..."}``: one
  message of the stream, as its HTTP route's JSON; ``cursor`` when it moved the
  stream on (`gateway.positions`).
- ``{"type": "end", "id": "s1", "cursor": "..."}``: the node ended the stream.
- ``{"type": "error", "id": "s1", "error": {google.rpc.Status}, "cursor":
  "..."}``: the subscription failed for good (bad request, refused token, the
  cluster unreachable past ``--ws-resume-timeout``), or (without ``id``) a
  frame was refused; the socket stays open.

A subscription survives its node: when the stream fails (the node died, its
slot moved, the stream went silent, the subscriber fell too far behind), the
gateway opens it again after the last message it delivered, on whichever node
leads the slot by then, so the client sees neither a gap nor a repeat (a watch,
which cannot resume, ends with an error instead). The re-opened stream's first
messages (its confirmation, a notification channel's ChannelState) come again.
Only the gateway's own end makes the client reconnect, and its cursors resume
from there. A socket with no subscription and no frame from the client for ``--ws-idle-timeout`` is
closed (code 1000); uvicorn's WebSocket pings find dead peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.websockets import WebSocket, WebSocketDisconnect

from clients.errors import DeadlineExceededError, MeshError
from clients.retry import Verdict, classify
from common.logs import loggable
from gateway.errors import GatewayError, status_json
from gateway.positions import CursorError, Position, position_for
from gateway.rules import Route
from gateway.streams import ask_heartbeats, is_heartbeat, read
from gateway.transcode import FieldError, message_of, to_json
from gateway.upstream import Call, Upstream

__all__ = ["WebSocketSettings", "serve_socket", "streaming_rpcs"]

log = logging.getLogger("gateway.websocket")

MAX_ID = 128
RESUME_BACKOFF = (0.1, 0.2, 0.5, 1.0)
"""Seconds between attempts to re-open a failed subscription (the last repeats)."""


@dataclass(frozen=True)
class WebSocketSettings:
    heartbeat: float = 15.0
    """Seconds of silence after which the gateway sends a heartbeat frame."""
    idle_timeout: float = 60.0
    """A socket with no subscription and no client frame for this long is closed."""
    auth_timeout: float = 10.0
    """How long the first frame may take."""
    max_subscriptions: int = 100
    """Subscriptions one socket may hold at once."""
    resume_timeout: float = 30.0
    """How long a failed subscription keeps trying to re-open before it errors."""


def streaming_rpcs(routes: list[Route]) -> dict[str, Route]:
    """``notify.Subscribe`` -> its route, for every server-streaming call."""
    found: dict[str, Route] = {}
    for route in routes:
        if route.streaming:
            found.setdefault(f"{route.service}.{route.method.name}", route)
    return found


def _invalid(field: str, description: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}",
                        "INVALID_ARGUMENT", violations={field: description})


def _resumable(error: MeshError) -> bool:
    """A failure a new stream, after the last message delivered, may get past."""
    return classify(error) is not Verdict.FINAL or isinstance(error, DeadlineExceededError) \
        or error.reason == "SUBSCRIBER_TOO_SLOW"


def _one_name(request: Any) -> None:
    """A notification subscription here follows one channel or one inbox: its
    stream is served by that name's owner, and re-opened there after a failure
    (open one subscription per channel; they share the socket)."""
    if request.patterns:
        raise _invalid("request.patterns", "not served over the gateway yet")
    if len(request.channels) + bool(request.inbox) != 1:
        raise _invalid("request.channels", "one channel, or an inbox alone, per subscription")


class _Socket:
    """One client's socket: its frames in, its subscriptions' frames out."""

    def __init__(self, websocket: WebSocket, upstream: Upstream, rpcs: dict[str, Route],
                 settings: WebSocketSettings,
                 admit: Callable[[str], Awaitable[None]]) -> None:
        self.websocket = websocket
        self.upstream = upstream
        self.rpcs = rpcs
        self.settings = settings
        self.admit = admit
        self.authorization = ""
        self.subscriptions: dict[str, asyncio.Task[None]] = {}
        self._sending = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self._sent = self._heard = loop.time()

    async def send(self, frame: dict[str, Any]) -> None:
        async with self._sending:
            await self.websocket.send_text(json.dumps(frame, separators=(",", ":")))
            self._sent = asyncio.get_running_loop().time()

    async def refuse(self, error: MeshError, sid: str = "", cursor: str = "") -> None:
        frame: dict[str, Any] = {"type": "error", "error": status_json(error)}
        if sid:
            frame["id"] = sid
            frame["cursor"] = cursor
        await self.send(frame)

    async def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next frame as a JSON object (None: ``timeout`` passed first).
        Raises GatewayError for a frame that is not a JSON object."""
        received = await asyncio.wait_for(self.websocket.receive(), timeout)
        if received["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(received.get("code", 1000))
        self._heard = asyncio.get_running_loop().time()
        text = received.get("text")
        if text is None:
            text = (received.get("bytes") or b"").decode("utf-8", "replace")
        try:
            frame = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise _invalid("frame", "not valid JSON") from None
        if not isinstance(frame, dict):
            raise _invalid("frame", "must be a JSON object")
        return frame

    async def run(self, token: str) -> None:
        await self.websocket.accept()
        pending: dict[str, Any] | None = None
        if token:
            self.authorization = f"Bearer {token}"
        else:
            try:
                first = await self.receive(self.settings.auth_timeout)
            except TimeoutError:
                await self.websocket.close(1008, "no first frame")
                return
            except GatewayError as exc:
                await self.refuse(exc)
                first = None
            if first is not None and first.get("type") == "auth":
                value = first.get("token")
                if not isinstance(value, str) or not value:
                    await self.refuse(_invalid("token", "a non-empty string"))
                    await self.websocket.close(1008, "bad auth frame")
                    return
                self.authorization = f"Bearer {value}"
            else:
                pending = first
        try:
            await self.admit(self.authorization)
        except GatewayError as exc:  # an edge rate limit
            await self.refuse(exc)
            await self.websocket.close(1008, exc.reason)
            return
        await self.send({"type": "welcome", "heartbeat": self.settings.heartbeat})
        beating = asyncio.get_running_loop().create_task(self._heartbeats())
        try:
            if pending is not None:
                await self.handle(pending)
            await self._frames()
        finally:
            beating.cancel()
            for task in self.subscriptions.values():
                task.cancel()
            for task in [beating, *self.subscriptions.values()]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _frames(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await self.receive(self.settings.heartbeat)
            except TimeoutError:
                if not self.subscriptions and \
                        loop.time() - self._heard >= self.settings.idle_timeout:
                    await self.websocket.close(1000, "idle")
                    return
                continue
            except GatewayError as exc:
                await self.refuse(exc)
                continue
            if frame is not None:
                await self.handle(frame)

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._sent + self.settings.heartbeat - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self.send({"type": "heartbeat"})

    async def handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        sid = frame.get("id", "")
        try:
            if kind == "ping":
                await self.send({"type": "pong"})
            elif kind == "subscribe":
                await self.subscribe(frame)
            elif kind == "unsubscribe":
                task = self.subscriptions.pop(sid, None) if isinstance(sid, str) else None
                if task is None:
                    raise _invalid("id", "no such subscription")
                task.cancel()
            elif kind == "auth":
                raise _invalid("type", "auth comes first, once")
            else:
                raise _invalid("type", "one of subscribe, unsubscribe, ping")
        except GatewayError as exc:
            await self.refuse(exc, sid if isinstance(sid, str) and kind == "subscribe" else "")

    async def subscribe(self, frame: dict[str, Any]) -> None:
        sid = frame.get("id")
        if not isinstance(sid, str) or not 0 < len(sid) <= MAX_ID:
            raise _invalid("id", f"a string of 1 to {MAX_ID} characters")
        if sid in self.subscriptions:
            raise _invalid("id", "already subscribed under this id")
        if len(self.subscriptions) >= self.settings.max_subscriptions:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"at most {self.settings.max_subscriptions} subscriptions "
                               "per socket", "TOO_MANY_SUBSCRIPTIONS")
        name = frame.get("rpc")
        route = self.rpcs.get(name) if isinstance(name, str) else None
        if route is None:
            raise _invalid("rpc", "one of " + ", ".join(sorted(self.rpcs)))
        values = frame.get("request", {})
        if not isinstance(values, dict):
            raise _invalid("request", "must be a JSON object")
        try:
            request = message_of(route, values)
        except FieldError as exc:
            raise _invalid(f"request.{exc.field}", exc.description) from None
        if route.method.full_name == "mesh.notify.v1.NotifyService.Subscribe":
            _one_name(request)
        cursor = frame.get("cursor", "")
        position = position_for(route.method.full_name)
        try:
            if not isinstance(cursor, str):
                raise CursorError("must be a string")
            position.restore(cursor)
        except CursorError as exc:
            raise _invalid("cursor", str(exc)) from None
        await self.admit(self.authorization)
        ask_heartbeats(request)
        call = Call(route, request, self.authorization)
        task = asyncio.get_running_loop().create_task(self._follow(sid, call, position))
        self.subscriptions[sid] = task
        task.add_done_callback(lambda t: self._forget(sid, t))

    def _forget(self, sid: str, task: asyncio.Task[None]) -> None:
        if self.subscriptions.get(sid) is task:
            del self.subscriptions[sid]
        if not task.cancelled() and task.exception() is not None:
            # Most often: a send on a socket the client has just closed.
            log.debug("subscription %s ended: %s", loggable(sid), loggable(repr(task.exception())))

    async def _follow(self, sid: str, call: Call, position: Position) -> None:
        """Deliver one subscription, re-opening it after a failure; see the module doc."""
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        attempts = 0
        while True:
            position.apply(call.request)
            try:
                stream = await self.upstream.stream(call)
            except MeshError as exc:
                failing_since = failing_since or loop.time()
                if not (position.resumable and _resumable(exc)) or \
                        loop.time() - failing_since > self.settings.resume_timeout:
                    await self.refuse(exc, sid, position.cursor())
                    return
                await asyncio.sleep(RESUME_BACKOFF[min(attempts, len(RESUME_BACKOFF) - 1)])
                attempts += 1
                continue
            failing_since, attempts = None, 0
            messages = read(stream, self.settings.heartbeat)
            try:
                async for item in messages:
                    if item is None or is_heartbeat(item):
                        continue
                    frame: dict[str, Any] = {"type": "message", "id": sid,
                                             "message": to_json(item)}
                    if position.see(item):
                        frame["cursor"] = position.cursor()
                    await self.send(frame)
                await self.send({"type": "end", "id": sid, "cursor": position.cursor()})
                return
            except MeshError as exc:
                if not (position.resumable and _resumable(exc)):
                    await self.refuse(exc, sid, position.cursor())
                    return
                log.info("subscription %s: its stream from %s failed (%s); resuming", loggable(sid),
                         stream.address, exc.reason or exc.code)
                failing_since = loop.time()
            finally:
                await messages.aclose()
                stream.release()


async def serve_socket(websocket: WebSocket, upstream: Upstream, rpcs: dict[str, Route],
                       settings: WebSocketSettings,
                       admit: Callable[[str], Awaitable[None]]) -> None:
    """Serve one WebSocket until the client or the gateway ends it."""
    socket = _Socket(websocket, upstream, rpcs, settings, admit)
    # RuntimeError: a send on a socket the client already closed.
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await socket.run(websocket.query_params.get("token", ""))
