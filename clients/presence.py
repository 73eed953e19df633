"""Presence in a channel: ``async with await mesh.notify.join("room", "device-1"): ...``.

Joining puts the client in the channel's presence for ``ttl`` seconds; the
handle joins again every ttl/3 in the background (the heartbeat), so the client
stays while the process lives and disappears about a ttl after it dies.
Leaving (or closing the handle) takes it out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from clients.errors import MeshError
from mesh.notify.v1 import notify_pb2 as pb

__all__ = ["PresenceEvent", "PresenceHandle", "PresenceMember", "PresenceStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PresenceMember:
    """A client present in a channel."""

    client_id: str
    user: str
    info: bytes
    join_time: float
    expire_time: float
    """Seconds since the epoch, on the primary's clock."""

    @classmethod
    def from_proto(cls, m: pb.PresenceMember) -> PresenceMember:
        return cls(m.client_id, m.user, m.info, m.join_time.ToNanoseconds() / 1e9,
                   m.expire_time.ToNanoseconds() / 1e9)


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A client joined (``joined``) or left a channel subscribed with presence events."""

    channel: str
    joined: bool
    member: PresenceMember
    expired: bool
    """A leave by expiry: no heartbeat within its ttl."""
    time: float

    @classmethod
    def from_proto(cls, e: pb.PresenceEvent) -> PresenceEvent:
        return cls(e.channel, e.change == pb.PRESENCE_CHANGE_JOIN,
                   PresenceMember.from_proto(e.member), e.expired,
                   e.time.ToNanoseconds() / 1e9)


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """How many clients, and distinct users, a channel has present."""

    num_clients: int
    num_users: int


class PresenceHandle:
    """A joined client, kept present by a background heartbeat until `leave`."""

    def __init__(self, channel: str, client_id: str, ttl: float, expire_time: float,
                 join: Callable[[], Awaitable[float]],
                 leave: Callable[[], Awaitable[bool]]) -> None:
        self.channel = channel
        self.client_id = client_id
        self.ttl = ttl
        self.expire_time = expire_time
        """When the client leaves unless the next heartbeat lands (primary's clock)."""
        self.failures = 0
        """Heartbeats that failed in a row (the next ones keep trying)."""
        self._join = join
        self._leave = leave
        self._task = asyncio.get_running_loop().create_task(
            self._beat(), name=f"presence:{channel}:{client_id}")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                self.expire_time = await self._join()
                self.failures = 0
            except MeshError as exc:
                # Keep trying (a failover takes a moment); the ttl gives 3 chances.
                self.failures += 1
                log.warning("presence of %s in %s: heartbeat failed (%s)", self.client_id,
                            self.channel, exc)

    async def leave(self) -> bool:
        """Stop the heartbeat and leave now; whether the client was still present."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return await self._leave()

    async def __aenter__(self) -> PresenceHandle:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.leave()
