"""Typed notification calls: ``await mesh.notify.publish("news", b"hello")``.

A channel name (an inbox's user) routes like a cache key, so a channel lives
on its slot's primary, which keeps its history and serves its subscribers.

Retries (see ``clients.retry``): every call is safe to repeat. Publish and
Send carry an idempotency id (a UUID when none is given), so a retry after an
unknown outcome gets the original offset back instead of publishing twice
(while the entry is in the history); AckInbox only ever moves a cursor forward;
Join and Leave end in the same state however often they run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from clients.durations import duration, seconds
from clients.errors import InvalidArgumentError
from clients.notify_subscription import NotifySubscription
from clients.notify_types import (
    ChannelInfo,
    ChannelState,
    HistoryPage,
    InboxItem,
    InboxPage,
    NotifyItem,
    Position,
    Publication,
    Published,
    Sent,
    as_bytes,
    history_options,
)
from clients.presence import PresenceHandle, PresenceMember, PresenceStats
from clients.requests import build
from clients.retry import with_retries
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh

__all__ = ["ChannelInfo", "ChannelState", "HistoryPage", "InboxItem", "InboxPage",
           "NotifyClient", "NotifyItem", "NotifySubscription", "Position", "PresenceHandle",
           "PresenceMember", "PresenceStats", "Publication", "Published", "Sent"]

SERVICE = "notify"


class NotifyClient:
    """Channels and inboxes, spread over the mesh's nodes. Every call takes ``timeout=``."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def _call(self, key: str, method: str, request: Any, timeout: float | None) -> Any:
        async def attempt(budget: float, address: str | None) -> Any:
            address = address or self._mesh.route(SERVICE, key).address
            return await self._mesh.call(pb_grpc.NotifyServiceStub, address, method, request,
                                         budget)

        return await with_retries(self._mesh, attempt, timeout=timeout, safe=True)

    # -- channels ------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes | str, *,
                      idempotency_id: str | None = None, history_size: int = 0,
                      history_ttl: float | None = None, ephemeral: bool | None = None,
                      timeout: float | None = None) -> Published:
        """Append ``data`` to ``channel``'s history and deliver it to its
        subscribers; returns its offset once committed. ``history_size`` /
        ``history_ttl`` (seconds) / ``ephemeral`` (history in the primary's memory
        only: answered at once, lost at a failover) replace the channel's settings
        from now on (those not given: the node's defaults); none given: keep them."""
        request = pb.PublishRequest(
            channel=channel, data=as_bytes(data),
            idempotency_id=idempotency_id or uuid.uuid4().hex,
            options=history_options(history_size, history_ttl, ephemeral))
        r = await self._call(channel, "Publish", request, timeout)
        return Published(r.offset, r.epoch, r.duplicate)

    async def get_channel(self, channel: str, *, timeout: float | None = None) -> ChannelInfo:
        """``channel``'s epoch, offsets and retention."""
        r = await self._call(channel, "GetChannel", pb.GetChannelRequest(channel=channel),
                             timeout)
        return ChannelInfo(r.epoch, r.last_offset, r.earliest_offset, r.options.size,
                           r.options.ttl.ToNanoseconds() / 1e9, r.options.ephemeral)

    async def history(self, channel: str, after_offset: int = 0, *, limit: int = 100,
                      timeout: float | None = None) -> HistoryPage:
        """A page of what ``channel``'s history holds after ``after_offset``."""
        request = build(pb.HistoryRequest)(channel=channel, after_offset=after_offset, limit=limit)
        r = await self._call(channel, "History", request, timeout)
        return HistoryPage([Publication.from_proto(p, r.epoch) for p in r.publications],
                           r.epoch, r.last_offset, r.earliest_offset)

    def subscribe(
        self, channels: Iterable[str] | Mapping[str, Position | None] = (), *,
        inbox: str | None = None, inbox_since: Position | None = None,
        patterns: Iterable[str] = (), patterns_from_start: bool = False, buffer: int = 0,
        include_states: bool = False, presence_events: bool = False,
        heartbeat_interval: float | None = None,
        timeout: float | None = None,
    ) -> NotifySubscription:
        """Follow ``channels`` (names, or name -> the `Position` to resume after;
        None or a bare name: from now on), with ``inbox`` a user's inbox, and with
        ``patterns`` ("orders.*", "user.42.>") every matching channel on every
        node: those that exist start from now, those created later from their
        first offset (``patterns_from_start``: all channels not in ``channels``
        from their first offset, for resuming with a previous ``positions``).

        ``async with mesh.notify.subscribe({"news": pos}) as sub: async for item
        in sub: ...`` yields `Publication` and `InboxItem`, and a `ChannelState`
        whenever a channel could not be recovered (``include_states``: every
        one). Broken streams are subscribed again from the last offsets
        received, on the channels' current owners. ``buffer``: how far the node
        may let the subscription fall behind a channel (0: its setting).
        ``presence_events``: also yield `PresenceEvent` (joins and leaves) of the
        named channels and of those the patterns match, live only (a resumed
        stream does not replay them).
        """
        since = dict(channels) if isinstance(channels, Mapping) \
            else dict.fromkeys(channels)
        patterns = tuple(patterns)
        if not since and not inbox and not patterns:
            raise InvalidArgumentError(
                "give at least one channel, an inbox or a pattern",
                field_violations={"channels": "give at least one channel, an inbox or a "
                                              "pattern"})
        return NotifySubscription(self._mesh, since, inbox=inbox, inbox_since=inbox_since,
                                  buffer=buffer, include_states=include_states,
                                  timeout=timeout, heartbeat_interval=heartbeat_interval,
                                  patterns=patterns, patterns_from_start=patterns_from_start,
                                  presence_events=presence_events)

    # -- inboxes ---------------------------------------------------------------------

    async def send(self, user: str, data: bytes | str, *, idempotency_id: str | None = None,
                   inbox_size: int = 0, inbox_ttl: float | None = None,
                   timeout: float | None = None) -> Sent:
        """Put ``data`` in ``user``'s inbox (kept until its retention removes it);
        returns its cursor and the unread count once committed."""
        request = pb.SendRequest(user=user, data=as_bytes(data),
                                 idempotency_id=idempotency_id or uuid.uuid4().hex,
                                 options=history_options(inbox_size, inbox_ttl))
        r = await self._call(user, "Send", request, timeout)
        return Sent(r.cursor, r.epoch, r.duplicate, r.unread_count)

    async def read_inbox(self, user: str, after_cursor: int = 0, *, limit: int = 100,
                         timeout: float | None = None) -> InboxPage:
        """A page of ``user``'s notifications after ``after_cursor``, oldest first."""
        request = build(pb.ReadInboxRequest)(user=user, after_cursor=after_cursor, limit=limit)
        r = await self._call(user, "ReadInbox", request, timeout)
        return InboxPage([InboxItem.from_proto(i, r.epoch) for i in r.items], r.read_cursor,
                         r.unread_count, r.last_cursor, r.epoch)

    async def ack_inbox(self, user: str, cursor: int, *,
                        timeout: float | None = None) -> tuple[int, int]:
        """Mark ``user``'s notifications up to ``cursor`` as read; returns
        ``(read_cursor, unread_count)``."""
        request = build(pb.AckInboxRequest)(user=user, cursor=cursor)
        r = await self._call(user, "AckInbox", request, timeout)
        return r.read_cursor, r.unread_count

    # -- presence --------------------------------------------------------------------

    async def join(self, channel: str, client_id: str, *, info: bytes | str = b"",
                   user: str = "", ttl: float = 30.0,
                   timeout: float | None = None) -> PresenceHandle:
        """Put ``client_id`` in ``channel``'s presence; the handle keeps it there
        (joining again every ttl/3) until ``leave()`` or the end of ``async with``."""
        ttl = seconds(ttl, "ttl")  # also the handle's pace of re-joining
        request = pb.JoinRequest(channel=channel, client_id=client_id, user=user,
                                 info=as_bytes(info), ttl=duration(ttl, "ttl"))

        async def join() -> float:
            r = await self._call(channel, "Join", request, timeout)
            return float(r.expire_time.ToNanoseconds() / 1e9)

        async def leave() -> bool:
            r = await self._call(channel, "Leave", pb.LeaveRequest(
                channel=channel, client_id=client_id), timeout)
            return bool(r.was_present)

        return PresenceHandle(channel, client_id, ttl, await join(), join, leave)

    async def presence(self, channel: str, *,
                       timeout: float | None = None) -> list[PresenceMember]:
        """The clients present in ``channel``, by client id."""
        r = await self._call(channel, "Presence", pb.PresenceRequest(channel=channel), timeout)
        return [PresenceMember.from_proto(m) for m in r.members]

    async def presence_stats(self, channel: str, *,
                             timeout: float | None = None) -> PresenceStats:
        """How many clients (and distinct users) ``channel`` has present."""
        r = await self._call(channel, "PresenceStats",
                             pb.PresenceStatsRequest(channel=channel), timeout)
        return PresenceStats(r.num_clients, r.num_users)
