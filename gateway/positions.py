"""Where a stream stands, as an opaque cursor, and how a request resumes after it.

Server-Sent Events and WebSocket subscriptions both hand the client a cursor
with every message that moves the stream on; a client that reconnects sends
the last one back (SSE's ``Last-Event-ID``, the WebSocket ``cursor`` field)
and the gateway rewrites the request to continue after it, so nothing is
missed or repeated. The gateway uses the same positions to re-open a stream
itself when the node serving it fails.

- An event subscription of one stream: the cursor is the last event version;
  a resumed request asks for ``after_version``.
- A notification subscription: the cursor holds every channel's (and the
  inbox's) last offset and its epoch, as compact JSON; a resumed request
  names them as ``since`` (``inbox_since``). Offsets only mean something under
  their epoch, which the node's ChannelState messages announce.
- A cache watch: the cursor is its ``seq``, for display; a watch starts "from
  now" and cannot resume (``resumable`` is False).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import message

__all__ = ["CursorError", "EventsPosition", "NotifyPosition", "Position", "WatchPosition",
           "position_for"]


class CursorError(ValueError):
    """A cursor this kind of stream did not write."""


def _get(m: message.Message, name: str) -> Any:
    """A field of a message known only by its descriptor."""
    return getattr(m, name)


class Position:
    """A stream with no position: nothing to resume (the base case)."""

    resumable = False

    def see(self, response: message.Message) -> bool:
        """Move past ``response``; True when it moved the position (a new cursor)."""
        return False

    def cursor(self) -> str:
        """The position as an opaque string ('' before anything was seen)."""
        return ""

    def restore(self, cursor: str) -> None:
        """Take up the position ``cursor`` names; CursorError if it is not one.
        Here: ignored, as a reconnecting ``EventSource`` sends one whatever the stream."""

    def apply(self, request: message.Message) -> None:
        """Rewrite ``request`` to continue after the position."""


class EventsPosition(Position):
    """One event stream: the last version delivered."""

    resumable = True

    def __init__(self) -> None:
        self.version = 0

    def see(self, response: message.Message) -> bool:
        if response.WhichOneof("content") != "event":
            return False
        self.version = int(_get(response, "event").version)
        return True

    def cursor(self) -> str:
        return str(self.version) if self.version else ""

    def restore(self, cursor: str) -> None:
        if not cursor:
            return
        if not cursor.isdigit():
            raise CursorError("an event stream's cursor is a version number")
        self.version = int(cursor)

    def apply(self, request: message.Message) -> None:
        if self.version and request.WhichOneof("target") == "stream":
            request.after_version = self.version  # type: ignore[attr-defined]


class WatchPosition(Position):
    """A cache watch: its seq numbers changes, but a new watch starts from now."""

    def __init__(self) -> None:
        self.seq = 0

    def see(self, response: message.Message) -> bool:
        seq = int(_get(response, "seq"))
        if seq and seq != self.seq:
            self.seq = seq
            return True
        return False

    def cursor(self) -> str:
        return str(self.seq) if self.seq else ""


class NotifyPosition(Position):
    """Every channel's (and the inbox's) last offset and its epoch."""

    resumable = True

    def __init__(self) -> None:
        self.channels: dict[str, tuple[str, int]] = {}
        self.inbox: tuple[str, int] | None = None

    def see(self, response: message.Message) -> bool:
        kind = response.WhichOneof("content")
        if kind == "state":
            state = _get(response, "state")
            where = (str(state.epoch), int(state.offset))
            if state.inbox:
                self.inbox = where
            else:
                self.channels[str(state.channel)] = where
            return True
        if kind == "publication":
            p = _get(response, "publication")
            epoch = self.channels.get(p.channel, ("", 0))[0]
            self.channels[str(p.channel)] = (epoch, int(p.offset))
            return True
        if kind == "inbox_item":
            epoch = self.inbox[0] if self.inbox is not None else ""
            self.inbox = (epoch, int(_get(response, "inbox_item").cursor))
            return True
        return False

    def cursor(self) -> str:
        if not self.channels and self.inbox is None:
            return ""
        data: dict[str, Any] = {"c": {k: [e, o] for k, (e, o) in self.channels.items()}}
        if self.inbox is not None:
            data["i"] = list(self.inbox)
        return json.dumps(data, separators=(",", ":"))

    def restore(self, cursor: str) -> None:
        if not cursor:
            return
        try:
            data = json.loads(cursor)
            channels = {str(k): (str(v[0]), int(v[1])) for k, v in data["c"].items()}
            inbox = (str(data["i"][0]), int(data["i"][1])) if "i" in data else None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise CursorError("not a cursor this gateway wrote for a notification "
                              "subscription") from None
        if any(o < 0 for _, o in channels.values()) or (inbox is not None and inbox[1] < 0):
            raise CursorError("offsets are not negative")
        self.channels, self.inbox = channels, inbox

    def apply(self, request: message.Message) -> None:
        for subscription in _get(request, "channels"):
            where = self.channels.get(subscription.channel)
            if where is not None:
                subscription.since.epoch, subscription.since.offset = where
        if self.inbox is not None and _get(request, "inbox"):
            since = _get(request, "inbox_since")
            since.epoch, since.offset = self.inbox


_KINDS: dict[str, type[Position]] = {
    "mesh.events.v1.EventsService.Subscribe": EventsPosition,
    "mesh.notify.v1.NotifyService.Subscribe": NotifyPosition,
    "mesh.cache.v1.CacheService.Watch": WatchPosition,
}


def position_for(method: str) -> Position:
    """A fresh position for a stream of ``method`` (full name)."""
    return _KINDS.get(method, Position)()
