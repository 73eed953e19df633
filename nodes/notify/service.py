"""The gRPC face of notifications: validation, routing to the channel's (or the
inbox's) group, commit before answering, subscriptions from the committed logs.

A channel lives in the group that owns its name's slot, an inbox in the group
of its user's; only that group's primary serves them. Writes are answered once
committed (on the primary's disk, and acknowledged by every in-sync replica
after theirs), so a subscriber resuming at a new primary after a failover, or
after every node restarted, finds every publication that was acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import ClassVar, TypeAlias, TypeVar, cast

import grpc

from common import heartbeat as hb
from common import tenancy
from common.clock import MILLISECOND, SYSTEM_CLOCK, Clock, from_seconds
from common.errors import MeshStatusError, ServiceError
from common.metrics import Snapshot, one
from common.slots import slot_for
from common.tenancy import scoped
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_pb2_grpc as pb_grpc
from mesh.notify.v1 import notify_replication_pb2 as npb
from nodes.config import NodeConfig, NotifyLimits
from nodes.forwarding import Forwarder
from nodes.notify import errors
from nodes.notify import validation as v
from nodes.notify.feeds import (
    SHUTDOWN,
    Ended,
    Feed,
    SubscriptionHub,
    follow,
    inbox_item,
    open_feed,
    publication,
)
from nodes.notify.machine import NOTIFY, NotifyMachine
from nodes.notify.model import CHANNEL, INBOX, PRESENCE, LogKey
from nodes.notify.patterns import PatternWatch
from nodes.notify.presence import Member
from nodes.notify.primary import NotifyPrimary
from nodes.notify.storage import SCHEMA, TABLES
from nodes.pages import within_page
from nodes.plugin import needs_journal
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.replication.machine import ServiceKind
from nodes.replication.manager import Redirect, Replication
from nodes.routing import Routed, routed

__all__ = ["NotifyService"]

Ctx: TypeAlias = grpc.aio.ServicerContext
_Answer = TypeVar("_Answer")

PRESENCE_GRAIN = 50 * MILLISECOND
"""Expiries closer together than this are handled by one tick."""


def _machine(group: Group) -> NotifyMachine:
    return cast(NotifyMachine, group.machines[NOTIFY])


def _primary(group: Group) -> NotifyPrimary:
    return NotifyPrimary(group, _machine(group))


def _options(settings: npb.LogSettings) -> pb.HistoryOptions:
    options = pb.HistoryOptions(size=settings.size)
    options.ttl.FromNanoseconds(settings.ttl_ns)
    return options


class NotifyService(Routed, pb_grpc.NotifyServiceServicer):
    """NotifyService over one `NotifyMachine` per replica group; a channel (an
    inbox) lives where its name's (user's) slot is led."""

    name: ClassVar[str] = "notify"
    kind: ClassVar[ServiceKind] = NOTIFY
    durable: ClassVar[bool] = True
    descriptor = pb.DESCRIPTOR.services_by_name["NotifyService"]

    def __init__(self, limits: NotifyLimits, journal: Journal,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.limits = limits
        self._journal = journal
        journal.create_tables(SCHEMA, TABLES)
        self.clock = clock  # retention by age is judged by it
        self.hub = SubscriptionHub(limits.max_subscriptions)
        self.published_total = 0
        """Entries appended through this node as primary (for metrics)."""
        self._defaults = {
            CHANNEL: v.settings(pb.HistoryOptions(), limits),
            INBOX: v.settings(pb.HistoryOptions(), limits, inbox=True),
        }
        self._replication: Replication | None = None
        self._next_trim: dict[int, int] = {}
        """Group -> when its logs are next checked for retention by age."""

    @classmethod
    def create(cls, config: NodeConfig, journal: Journal | None,
               clock: Clock = SYSTEM_CLOCK) -> NotifyService:
        return cls(config.notify, needs_journal(journal, cls.name), clock)

    def machine(self, group: Group) -> NotifyMachine:
        """The notification state machine for a group (the replication layer's factory)."""
        return NotifyMachine(group, self._journal, self.hub.end_group, self.clock)

    # -- lifecycle ---------------------------------------------------------------

    def start(self, replication: Replication, forwarder: Forwarder) -> None:
        self._replication = replication
        self.start_routing(forwarder)

    async def close(self) -> None:
        """End every subscription."""
        await self.hub.shutdown()

    def metrics(self, replication: Replication) -> Snapshot:
        channels = inboxes = 0
        for machine in replication.led(NOTIFY):
            for kind, _ in cast(NotifyMachine, machine).logs:
                if kind == CHANNEL:
                    channels += 1
                elif kind == INBOX:
                    inboxes += 1
        return Snapshot(
            gauges={
                "mesh_notify_channels": ("Channels in led groups", one(channels)),
                "mesh_notify_inboxes": ("Inboxes in led groups", one(inboxes)),
                "mesh_notify_subscriptions": ("Open notify Subscribe streams on this node",
                                              one(len(self.hub))),
            },
            counters={"mesh_notify_appended": (
                "Publications and inbox notifications appended through this node as primary",
                one(self.published_total))},
        )

    @property
    def tick_interval_ns(self) -> int:
        return from_seconds(self.limits.trim_interval)

    def tick(self, group: Group, now_ns: int) -> int | None:
        primary = _primary(group)
        # Retention by age is judged here, on the primary's clock, and each
        # removal replicated as a command: replicas never read their clock. Once
        # per trim interval, however often presence brings the ticker back (a
        # pass looks at the logs due, and at every ephemeral channel).
        if now_ns >= self._next_trim.get(group.group_id, 0):
            self._next_trim[group.group_id] = now_ns + self.tick_interval_ns
            primary.trim(now_ns, from_seconds(self.limits.channel_lifetime))
        # Presence expiry too; come back when the next member is due (give or
        # take PRESENCE_GRAIN), so that a client leaves close to its ttl.
        if primary.expire(now_ns):
            # Subscribers of presence events hear of the leaves once committed.
            self.hub.notify_when_committed(group, group.log.last_seq)
        due = primary.machine.presence.next_expiry()
        return None if due is None else max(due, now_ns + PRESENCE_GRAIN)

    # -- commits -------------------------------------------------------------------

    async def _committed(self, group: Group, seq: int) -> None:
        """Wait for ``seq`` to commit, then wake the group's subscriptions."""
        try:
            await group.wait_committed(seq)
        except asyncio.CancelledError:
            # The caller left, but the write goes on: subscribers must still
            # hear of it when it commits.
            self.hub.notify_when_committed(group, seq)
            raise
        self.hub.notify(group.group_id)

    # -- channels ------------------------------------------------------------------

    @routed("channel")
    async def Publish(self, request: pb.PublishRequest, context: Ctx,
                      group: Group) -> pb.PublishResponse:
        v.check_name(request.channel, "channel")
        v.check_data(request.data, self.limits)
        v.check_id(request.idempotency_id)
        has_options = request.HasField("options")
        settings = v.settings(request.options, self.limits) if has_options else None
        result = _primary(group).publish(
            scoped(request.channel), request.data, request.idempotency_id, settings,
            request.options.ephemeral if has_options else None, self._defaults[CHANNEL],
            self.clock.wall_ns())
        if result.seq:
            await self._committed(group, result.seq)
        else:  # ephemeral: in memory here, nothing to wait for
            self.hub.notify(group.group_id)
        if not result.duplicate:
            self.published_total += 1
        return pb.PublishResponse(offset=result.offset, epoch=result.epoch,
                                  duplicate=result.duplicate)

    @routed("channel")
    async def GetChannel(self, request: pb.GetChannelRequest, context: Ctx,
                         group: Group) -> pb.GetChannelResponse:
        v.check_name(request.channel, "channel")
        name = scoped(request.channel)
        machine = _machine(group)
        ephemeral = machine.ephemeral.get(name)
        log = ephemeral or machine.logs.get((CHANNEL, name))
        last = log.committed_last(group.commit_seq) if log is not None else 0
        if log is None or last == 0:  # nothing (committed) yet
            return pb.GetChannelResponse()
        options = _options(npb.LogSettings(size=log.size, ttl_ns=log.ttl_ns))
        options.ephemeral = ephemeral is not None
        answer = pb.GetChannelResponse(
            epoch=log.epoch, last_offset=last, earliest_offset=min(log.earliest, last + 1),
            options=options)
        if ephemeral is None:  # its settings as read, committed (read first: see _present)
            await group.wait_committed(log.changed_seq)
        return answer

    @routed("channel")
    async def History(self, request: pb.HistoryRequest, context: Ctx,
                      group: Group) -> pb.HistoryResponse:
        v.check_name(request.channel, "channel")
        limit = v.page_size(request.limit)
        log = _machine(group).find((CHANNEL, scoped(request.channel)))
        last = log.committed_last(group.commit_seq) if log is not None else 0
        if log is None or last == 0:  # nothing (committed) yet
            return pb.HistoryResponse()
        return pb.HistoryResponse(
            publications=within_page([publication(request.channel, e)
                                      for e in log.after(request.after_offset, last, limit)]),
            epoch=log.epoch, last_offset=last, earliest_offset=min(log.earliest, last + 1))

    # -- inboxes ---------------------------------------------------------------------

    @routed("user")
    async def Send(self, request: pb.SendRequest, context: Ctx,
                   group: Group) -> pb.SendResponse:
        v.check_name(request.user, "user")
        v.check_data(request.data, self.limits)
        v.check_id(request.idempotency_id)
        settings = v.settings(request.options, self.limits, inbox=True) \
            if request.HasField("options") else None
        user = scoped(request.user)
        result = _primary(group).append(INBOX, user, request.data, request.idempotency_id,
                                        settings, self._defaults[INBOX])
        # Taken before the await: the group may leave this node (its machine
        # with it) between the commit and this call's turn, and the write stands.
        log = _machine(group).logs.get((INBOX, user))
        await self._committed(group, result.seq)
        if not result.duplicate:
            self.published_total += 1
        unread = log.unread(group.commit_seq) if log is not None else 0
        return pb.SendResponse(cursor=result.offset, epoch=result.epoch,
                               duplicate=result.duplicate, unread_count=unread)

    @routed("user")
    async def ReadInbox(self, request: pb.ReadInboxRequest, context: Ctx,
                        group: Group) -> pb.ReadInboxResponse:
        v.check_name(request.user, "user")
        limit = v.page_size(request.limit)
        log = _machine(group).logs.get((INBOX, scoped(request.user)))
        if log is None:
            return pb.ReadInboxResponse()
        commit = group.commit_seq
        last = log.committed_last(commit)
        items = within_page([inbox_item(request.user, e)
                             for e in log.after(request.after_cursor, last, limit)])
        answer = pb.ReadInboxResponse(items=items, read_cursor=log.read_cursor,
                                      unread_count=log.unread(commit), last_cursor=last,
                                      epoch=log.epoch)
        await group.wait_committed(log.changed_seq)  # its cursor as read, committed
        return answer

    @routed("user")
    async def AckInbox(self, request: pb.AckInboxRequest, context: Ctx,
                       group: Group) -> pb.AckInboxResponse:
        v.check_name(request.user, "user")
        user = scoped(request.user)
        read_cursor, seq = _primary(group).mark_read(user, request.cursor)
        log = _machine(group).logs.get((INBOX, user))  # before the await, as in Send
        if seq:
            await group.wait_committed(seq)
        unread = log.unread(group.commit_seq) if log is not None else 0
        return pb.AckInboxResponse(read_cursor=read_cursor, unread_count=unread)

    # -- presence --------------------------------------------------------------------

    @routed("channel")
    async def Join(self, request: pb.JoinRequest, context: Ctx,
                   group: Group) -> pb.JoinResponse:
        v.check_join(request)
        ttl_ns = v.presence_ttl(request.ttl)
        member, seq = _primary(group).join(scoped(request.channel), request.client_id,
                                           request.user, request.info, ttl_ns)
        await self._committed(group, seq)  # wakes subscribers of presence events
        response = pb.JoinResponse()
        response.expire_time.FromNanoseconds(member.expires_ns)
        return response

    @routed("channel")
    async def Leave(self, request: pb.LeaveRequest, context: Ctx,
                    group: Group) -> pb.LeaveResponse:
        v.check_name(request.channel, "channel")
        v.check_id(request.client_id, "client_id")
        was_present, seq = _primary(group).leave(scoped(request.channel), request.client_id)
        if seq:
            await self._committed(group, seq)
        return pb.LeaveResponse(was_present=was_present)

    @routed("channel")
    async def Presence(self, request: pb.PresenceRequest, context: Ctx,
                       group: Group) -> pb.PresenceResponse:
        v.check_name(request.channel, "channel")
        return await self._present(group, scoped(request.channel), lambda members: (
            pb.PresenceResponse(members=[m.to_proto() for _, m in sorted(members.items())])))

    @routed("channel")
    async def PresenceStats(self, request: pb.PresenceStatsRequest, context: Ctx,
                            group: Group) -> pb.PresenceStatsResponse:
        v.check_name(request.channel, "channel")
        return await self._present(group, scoped(request.channel), lambda members: (
            pb.PresenceStatsResponse(num_clients=len(members), num_users=len(
                {m.user for m in members.values() if m.user}))))

    @staticmethod
    async def _present(group: Group, channel: str,
                       answer: Callable[[Mapping[str, Member]], _Answer]) -> _Answer:
        """The ``answer`` made from ``channel``'s members, once what it read is
        committed. Made first, then the wait: a change made during the wait (not
        yet committed; members change in place) is not in it, and nothing is
        read from a group that may have left meanwhile."""
        presence = _machine(group).presence
        made = answer(presence.channels.get(channel, {}))
        await group.wait_committed(presence.changed_seq.get(channel, 0))
        return made

    # -- subscriptions ---------------------------------------------------------------

    async def Subscribe(self, request: pb.SubscribeRequest, context: Ctx
                        ) -> AsyncIterator[pb.SubscribeResponse]:
        patterns = v.check_patterns(request.patterns)
        wanted = v.subscription(request.channels, request.inbox,
                                request.inbox_since if request.HasField("inbox_since")
                                else None, patterns=bool(patterns))
        buffer = min(request.buffer or self.limits.subscriber_buffer,
                     self.limits.subscriber_buffer)
        heartbeat = hb.interval(
            "heartbeat_interval",
            request.heartbeat_interval if request.HasField("heartbeat_interval") else None,
            self.limits.heartbeat_interval)
        if len(wanted) == 1 and not patterns:
            # One name: served where it is led, or forwarded there (any caller,
            # grpcurl included, can follow one channel through any node).
            target = self.owner(wanted[0].name, context)
            if isinstance(target, Redirect):
                messages = self.forward_stream(target, "Subscribe", request, context)
            else:
                messages = self._serve(wanted, [target], buffer, heartbeat)
        else:
            # Several, or patterns: each must be led here (the client splits them
            # by owner).
            by_group = self._pattern_slots(v.subscribe_slots(request.slots)) if patterns \
                else {}
            watches = [PatternWatch(_machine(group), frozenset(slots), patterns,
                                    tenancy.prefix(), set(), request.patterns_from_start,
                                    request.patterns_presence_events)
                       for group, slots in by_group.values()]
            messages = self._serve(wanted, [self.here(slot_for(w.name)) for w in wanted],
                                   buffer, heartbeat, watches)
        async for message in messages:
            yield message

    def _pattern_slots(self, slots: list[int]) -> dict[int, tuple[Group, list[int]]]:
        """``slots`` by the local group leading them; WRONG_OWNER if one is led elsewhere."""
        replication = self._replication
        assert replication is not None, "start() first"
        table = replication.table
        if table is None:
            replication.resolve(slots[0])  # raises NO_MAP
        assert table is not None
        by_view: dict[int, list[int]] = {}
        for slot in slots:
            view = table.group_of_slot(slot)
            by_view.setdefault(view.group_id if view is not None else -1, []).append(slot)
        found: dict[int, tuple[Group, list[int]]] = {}
        for group_slots in by_view.values():
            group = self.here(group_slots[0])  # one lookup per group
            found[group.group_id] = (group, group_slots)
        return found

    async def _serve(self, wanted: list[v.Wanted], groups: list[Group], buffer: int,
                     heartbeat: float, watches: Sequence[PatternWatch] = ()
                     ) -> AsyncIterator[pb.SubscribeResponse]:
        sub = self.hub.open(frozenset(g.group_id for g in groups)
                            | {w.group_id for w in watches})
        feeds: list[Feed] = []
        try:
            # No await from registering to reading where each feed starts: a
            # commit after this point wakes the subscription, one before it is
            # replayed.
            states: list[pb.SubscribeResponse] = []
            named: set[LogKey] = set()
            for w, group in zip(wanted, groups, strict=True):
                key = (INBOX if w.inbox else CHANNEL, scoped(w.name))
                feed, state = open_feed(_machine(group), key, w.name, w.since)
                feeds.append(feed)
                states.append(state)
                named.add(key)
                if w.presence_events:  # joins and leaves from now on, no state
                    feeds.append(open_feed(_machine(group), (PRESENCE, key[1]), w.name,
                                           None)[0])
                    named.add((PRESENCE, key[1]))
            for watch in watches:
                watch.followed |= named
                for feed, first in watch.discover(initial=True):
                    feeds.append(feed)
                    if first is not None:
                        states.append(first)
            confirmation = pb.SubscriptionConfirmation(subscription_id=sub.id,
                                                       initial_states=len(states))
            if heartbeat > 0:
                confirmation.heartbeat_interval.CopyFrom(hb.as_duration(heartbeat))
            yield pb.SubscribeResponse(confirmation=confirmation)
            for state in states:
                yield state
            async for message in follow(sub, feeds, buffer, heartbeat, watches):
                yield message
        except Ended as ended:
            slot = next((slot_for(f.name) for f in feeds if f.group_id == ended.group_id),
                        next((min(w.slots) for w in watches if w.group_id == ended.group_id),
                             0))
            raise self._ended(ended.group_id, slot) from None
        finally:
            self.hub.close(sub)

    def _ended(self, group_id: int, slot: int) -> MeshStatusError | ServiceError:
        """Why a subscription ended: the node stops, the slot moved, or its group is
        changing primary (all retryable: subscribe again from the last offsets)."""
        if group_id == SHUTDOWN or self._replication is None:
            return errors.shutting_down()
        try:
            self.here(slot)
        except MeshStatusError as exc:
            return exc  # the slot moved (WRONG_OWNER), or its group has no primary now
        return errors.subscription_ended(group_id)
