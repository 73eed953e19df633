"""The blocking facade of notifications: ``SyncMesh.notify``.

    with SyncMesh() as mesh:
        mesh.notify.publish("news", "hello")
        with mesh.notify.subscribe({"news": None}) as sub:
            for item in sub: ...
        with mesh.notify.join("room", "device-1"):   # heartbeats on the client's loop
            print(mesh.notify.presence("room"))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from clients.notify_subscription import NotifySubscription
from clients.notify_types import (
    ChannelInfo,
    HistoryPage,
    InboxPage,
    NotifyItem,
    Position,
    Published,
    Sent,
)
from clients.presence import PresenceHandle, PresenceMember, PresenceStats

if TYPE_CHECKING:
    from clients.mesh import Mesh
    from clients.sync import _Loop

__all__ = ["SyncNotify", "SyncNotifySubscription", "SyncPresence"]


class SyncNotifySubscription:
    """A blocking ``NotifySubscription``: ``for item in sub: ...``; ``with`` closes it."""

    def __init__(self, subscription: NotifySubscription, loop: _Loop) -> None:
        self._sub = subscription
        self._loop = loop

    @property
    def positions(self) -> dict[str, Position]:
        return self._sub.positions

    @property
    def inbox_position(self) -> Position | None:
        return self._sub.inbox_position

    def __iter__(self) -> Iterator[NotifyItem]:
        return self._loop.iterate(self._sub)

    def close(self) -> None:
        self._loop.run(self._sub.close())

    def __enter__(self) -> SyncNotifySubscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class SyncPresence:
    """A blocking `PresenceHandle` (its heartbeat runs on the client's loop thread)."""

    def __init__(self, handle: PresenceHandle, loop: _Loop) -> None:
        self.handle = handle
        self._loop = loop

    def leave(self) -> bool:
        return self._loop.run(self.handle.leave())

    def __enter__(self) -> SyncPresence:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.leave()


class SyncNotify:
    """Blocking versions of ``NotifyClient``'s calls."""

    def __init__(self, mesh: Mesh, loop: _Loop) -> None:
        self._notify = mesh.notify
        self._loop = loop

    def publish(self, channel: str, data: bytes | str, *, idempotency_id: str | None = None,
                history_size: int = 0, history_ttl: float | None = None,
                ephemeral: bool | None = None, timeout: float | None = None) -> Published:
        return self._loop.run(self._notify.publish(
            channel, data, idempotency_id=idempotency_id, history_size=history_size,
            history_ttl=history_ttl, ephemeral=ephemeral, timeout=timeout))

    def get_channel(self, channel: str, *, timeout: float | None = None) -> ChannelInfo:
        return self._loop.run(self._notify.get_channel(channel, timeout=timeout))

    def history(self, channel: str, after_offset: int = 0, *, limit: int = 100,
                timeout: float | None = None) -> HistoryPage:
        return self._loop.run(self._notify.history(channel, after_offset, limit=limit,
                                                   timeout=timeout))

    def subscribe(self, channels: Iterable[str] | Mapping[str, Position | None] = (), *,
                  inbox: str | None = None, inbox_since: Position | None = None,
                  patterns: Iterable[str] = (), patterns_from_start: bool = False,
                  buffer: int = 0, include_states: bool = False,
                  presence_events: bool = False, heartbeat_interval: float | None = None,
                  timeout: float | None = None) -> SyncNotifySubscription:
        """A started subscription (confirmed by every node when this returns)."""

        async def started() -> NotifySubscription:
            return await self._notify.subscribe(
                channels, inbox=inbox, inbox_since=inbox_since, patterns=patterns,
                patterns_from_start=patterns_from_start, buffer=buffer,
                include_states=include_states, presence_events=presence_events,
                heartbeat_interval=heartbeat_interval,
                timeout=timeout).start()

        return SyncNotifySubscription(self._loop.run(started()), self._loop)

    def send(self, user: str, data: bytes | str, *, idempotency_id: str | None = None,
             inbox_size: int = 0, inbox_ttl: float | None = None,
             timeout: float | None = None) -> Sent:
        return self._loop.run(self._notify.send(
            user, data, idempotency_id=idempotency_id, inbox_size=inbox_size,
            inbox_ttl=inbox_ttl, timeout=timeout))

    def read_inbox(self, user: str, after_cursor: int = 0, *, limit: int = 100,
                   timeout: float | None = None) -> InboxPage:
        return self._loop.run(self._notify.read_inbox(user, after_cursor, limit=limit,
                                                      timeout=timeout))

    def ack_inbox(self, user: str, cursor: int, *,
                  timeout: float | None = None) -> tuple[int, int]:
        return self._loop.run(self._notify.ack_inbox(user, cursor, timeout=timeout))

    def join(self, channel: str, client_id: str, *, info: bytes | str = b"", user: str = "",
             ttl: float = 30.0, timeout: float | None = None) -> SyncPresence:
        return SyncPresence(self._loop.run(self._notify.join(
            channel, client_id, info=info, user=user, ttl=ttl, timeout=timeout)), self._loop)

    def presence(self, channel: str, *, timeout: float | None = None) -> list[PresenceMember]:
        return self._loop.run(self._notify.presence(channel, timeout=timeout))

    def presence_stats(self, channel: str, *, timeout: float | None = None) -> PresenceStats:
        return self._loop.run(self._notify.presence_stats(channel, timeout=timeout))
