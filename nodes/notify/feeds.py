"""Subscriptions: replay what was missed, then live, pulled from the committed logs.

A subscription follows one `Feed` per channel (and maybe one for an inbox,
one per channel whose presence events it wants, and those its pattern
watches find as channels appear): a cursor (the last offset sent) and the
epoch it belongs to. It loops: send
what is committed after each cursor, and once nothing is left, sleep until a
commit in one of its groups wakes it. Replay and live are the same read from
the same cursor, so the switch can neither skip nor repeat an entry. Nothing
is copied per subscriber: every subscriber of a channel reads the one history
in memory (fan-out from memory), and publishers never wait for subscribers.

What bounds a slow subscriber is its buffer: once it is more than that many
entries behind a channel's committed head (or retention removed entries it
had not read yet), it is ended with SUBSCRIBER_TOO_SLOW and the offset it got
to, from which it can resume (and learn, if so, that the history no longer
reaches back that far).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from common import heartbeat as hb
from mesh.notify.v1 import notify_pb2 as pb
from nodes.notify import errors
from nodes.notify.machine import NotifyMachine
from nodes.notify.model import CHANNEL, CREATED_NS, DATA, OFFSET, PRESENCE, Entry, LogKey
from nodes.subscriptions import SHUTDOWN, Ended, Subscription, SubscriptionHub

__all__ = [
    "BATCH",
    "SHUTDOWN",
    "Discovers",
    "Ended",
    "Feed",
    "Subscription",
    "SubscriptionHub",
    "follow",
    "inbox_item",
    "open_feed",
    "publication",
    "step",
]

BATCH = 256
"""Entries read per feed per step, between checks of the subscription."""


@dataclass(slots=True, eq=False)
class Feed:
    """One log a subscription follows."""

    key: LogKey
    name: str
    """As the subscriber named it (no tenant prefix)."""
    machine: NotifyMachine
    cursor: int
    """The last offset sent (or passed)."""
    epoch: str
    """The epoch ``cursor`` belongs to ("" before the log exists)."""
    seen_last: int = 0
    """The log's last committed offset when the feed last looked."""
    live: bool = False
    """It has sent everything committed at least once (replay is over)."""

    @property
    def group_id(self) -> int:
        return self.machine.group.group_id

    def state(self, recovered: bool, earliest: int) -> pb.SubscribeResponse:
        kind, _ = self.key
        return pb.SubscribeResponse(state=pb.ChannelState(
            channel=self.name if kind == CHANNEL else "",
            inbox="" if kind == CHANNEL else self.name,
            epoch=self.epoch, offset=self.cursor, recovered=recovered,
            earliest_offset=earliest))

    def message(self, entry: Entry) -> pb.SubscribeResponse:
        kind = self.key[0]
        if kind == CHANNEL:
            return pb.SubscribeResponse(publication=publication(self.name, entry))
        if kind == PRESENCE:
            return pb.SubscribeResponse(presence_event=presence_event(self.name, entry))
        return pb.SubscribeResponse(inbox_item=inbox_item(self.name, entry))


def publication(channel: str, entry: Entry) -> pb.Publication:
    """``entry`` of ``channel`` (as its tenant names it) on the wire."""
    message = pb.Publication(channel=channel, offset=entry[OFFSET], data=entry[DATA])
    message.publish_time.FromNanoseconds(entry[CREATED_NS])
    return message


def presence_event(channel: str, entry: Entry) -> pb.PresenceEvent:
    """A join or leave of ``channel``'s presence log on the wire."""
    event = pb.PresenceEvent.FromString(entry[DATA])
    event.channel = channel
    event.time.FromNanoseconds(entry[CREATED_NS])
    return event


def inbox_item(user: str, entry: Entry) -> pb.InboxItem:
    """``entry`` of ``user``'s inbox on the wire."""
    item = pb.InboxItem(user=user, cursor=entry[OFFSET], data=entry[DATA])
    item.send_time.FromNanoseconds(entry[CREATED_NS])
    return item


def open_feed(machine: NotifyMachine, key: LogKey, name: str,
              since: tuple[int, str] | None) -> tuple[Feed, pb.SubscribeResponse]:
    """The feed of ``key`` starting after ``since`` (None: after what is committed
    now), and the ChannelState that tells the subscriber where it starts."""
    log = machine.find(key)
    last = log.committed_last(machine.group.commit_seq) if log is not None else 0
    if log is None or last == 0:
        # Never published to (or forgotten, or its first entry not committed yet):
        # whatever comes is new, from offset 1.
        feed = Feed(key, name, machine, 0, "", live=True)
        return feed, feed.state(since is None or since[0] == 0, 1)
    earliest = log.earliest
    if since is None:
        feed = Feed(key, name, machine, last, log.epoch, last, live=True)
        return feed, feed.state(True, earliest)
    offset, epoch = since
    same = epoch == log.epoch or (offset == 0 and not epoch)
    if same and earliest - 1 <= offset <= last:
        # Nothing to replay: it is live already (its buffer counts from now).
        feed = Feed(key, name, machine, offset, log.epoch, last, live=offset == last)
        return feed, feed.state(True, earliest)
    # Another epoch, or entries after ``offset`` are gone (or it is beyond what
    # was ever committed): say so, and deliver what the history still holds.
    feed = Feed(key, name, machine, earliest - 1, log.epoch, last)
    return feed, feed.state(False, earliest)


def step(feed: Feed, buffer: int) -> tuple[list[pb.SubscribeResponse], bool]:
    """The next messages of ``feed`` (advancing its cursor), and whether more are
    committed already. Raises SUBSCRIBER_TOO_SLOW when it fell too far behind."""
    log = feed.machine.find(feed.key)
    out: list[pb.SubscribeResponse] = []
    if log is None:
        if feed.epoch and feed.cursor >= feed.seen_last:
            # Forgotten after everything was sent: its next epoch is a clean start.
            feed.epoch, feed.cursor, feed.seen_last = "", 0, 0
        return out, False
    last = log.committed_last(feed.machine.group.commit_seq)
    if log.epoch != feed.epoch:
        if last == 0:
            return out, False  # a new epoch whose first entry is not committed yet
        # A new epoch: a clean start only if we were waiting for its first entry
        # and it still holds it; else what the old epoch had after the cursor is lost.
        clean = not feed.epoch and feed.cursor == 0 and log.earliest == 1
        feed.epoch = log.epoch
        feed.cursor = log.earliest - 1
        if feed.key[0] != PRESENCE:  # presence events are live only: no positions
            out.append(feed.state(clean, log.earliest))
    feed.seen_last = last
    if feed.cursor < log.earliest - 1:
        raise errors.too_slow(feed.key, feed.cursor, feed.epoch,
                              "retention removed entries it had not received yet")
    if feed.live and last - feed.cursor > buffer:
        raise errors.too_slow(feed.key, feed.cursor, feed.epoch,
                              f"it is {last - feed.cursor} entries behind (its buffer is "
                              f"{buffer})")
    entries = log.after(feed.cursor, last, BATCH)
    out.extend(feed.message(e) for e in entries)
    if entries:
        feed.cursor = entries[-1][OFFSET]
    more = feed.cursor < last
    if not more:
        feed.live = True
    return out, more


def _heartbeat() -> pb.SubscribeResponse:
    return pb.SubscribeResponse(heartbeat=pb.Heartbeat(server_time=hb.now()))


class Discovers(Protocol):
    """Finds more feeds in a group as it changes (a pattern subscription's watch)."""

    @property
    def group_id(self) -> int: ...

    def discover(self, initial: bool = False
                 ) -> list[tuple[Feed, pb.SubscribeResponse | None]]: ...


async def follow(sub: Subscription, feeds: Sequence[Feed], buffer: int,
                 heartbeat: float = 0.0, watches: Sequence[Discovers] = ()
                 ) -> AsyncIterator[pb.SubscribeResponse]:
    """The feeds' entries as they are committed, forever (a Heartbeat after every
    ``heartbeat`` seconds of nothing to send; 0: none), and those of the feeds
    ``watches`` find as their groups change. Raises `Ended` when a group leaves
    this node, SUBSCRIBER_TOO_SLOW past ``buffer``."""
    feeds = list(feeds)
    by_group: dict[int, list[Feed]] = {}
    for feed in feeds:
        by_group.setdefault(feed.group_id, []).append(feed)
    watching: dict[int, list[Discovers]] = {}
    for watch in watches:
        watching.setdefault(watch.group_id, []).append(watch)
    todo: set[Feed] = set(feeds)
    while True:
        sub.wake.clear()
        sub.check()
        for group_id in sub.dirty:
            for watch in watching.get(group_id, ()):
                for feed, _ in watch.discover():  # new ones announce themselves
                    feeds.append(feed)
                    by_group.setdefault(group_id, []).append(feed)
            todo.update(by_group.get(group_id, ()))
        sub.dirty.clear()
        if not todo:
            while not await hb.idle(sub.wake, heartbeat):
                yield _heartbeat()
            continue
        pending: set[Feed] = set()
        for feed in [f for f in feeds if f in todo]:  # in subscription order
            messages, more = step(feed, buffer)
            for message in messages:
                yield message
            if more:
                pending.add(feed)
        todo = pending
