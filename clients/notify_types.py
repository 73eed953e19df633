"""The values the notification client takes and returns.

Numbering follows ``mesh.notify.v1``: offsets (inbox cursors) are 1-based per
channel (inbox) and mean something only under their epoch; 0 means "none".
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.durations import duration
from clients.presence import PresenceEvent
from clients.requests import build
from mesh.notify.v1 import notify_pb2 as pb

__all__ = ["ChannelInfo", "ChannelState", "HistoryPage", "InboxItem", "InboxPage", "NotifyItem",
           "Position", "PresenceEvent", "Publication", "Published", "Sent", "as_bytes",
           "history_options"]


def as_bytes(data: bytes | str) -> bytes:
    """A payload: bytes as they are, str as UTF-8."""
    return data.encode() if isinstance(data, str) else bytes(data)


def history_options(size: int, ttl: float | None, ephemeral: bool | None = None
                    ) -> pb.HistoryOptions | None:
    """The wire options, or None when none is given (keep what the log has)."""
    if not size and ttl is None and ephemeral is None:
        return None
    options = build(pb.HistoryOptions)(size=size, ephemeral=bool(ephemeral))
    if ttl is not None:
        options.ttl.CopyFrom(duration(ttl, "options.ttl"))
    return options


@dataclass(frozen=True, slots=True)
class Position:
    """The last offset received of a channel (or inbox) and its epoch: where a
    subscription resumes."""

    offset: int
    epoch: str

    def to_proto(self) -> pb.StreamPosition:
        return build(pb.StreamPosition)(offset=self.offset, epoch=self.epoch)


@dataclass(frozen=True, slots=True)
class Published:
    """Where a publication went."""

    offset: int
    epoch: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Sent:
    """Where an inbox notification went, and the inbox's unread count after it."""

    cursor: int
    epoch: str
    duplicate: bool
    unread_count: int


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication of a channel."""

    channel: str
    offset: int
    epoch: str
    data: bytes
    publish_time: float
    """Seconds since the epoch, on the primary's clock."""

    @classmethod
    def from_proto(cls, p: pb.Publication, epoch: str) -> Publication:
        return cls(p.channel, p.offset, epoch, p.data, p.publish_time.ToNanoseconds() / 1e9)


@dataclass(frozen=True, slots=True)
class InboxItem:
    """One notification of an inbox."""

    user: str
    cursor: int
    epoch: str
    data: bytes
    send_time: float

    @classmethod
    def from_proto(cls, item: pb.InboxItem, epoch: str) -> InboxItem:
        return cls(item.user, item.cursor, epoch, item.data,
                   item.send_time.ToNanoseconds() / 1e9)


@dataclass(frozen=True, slots=True)
class ChannelState:
    """Where a channel (or the inbox, ``channel`` then "") of a subscription
    starts. ``recovered`` False: entries after the requested offset up to
    ``earliest_offset`` - 1 are lost (retention removed them, or the epoch changed)."""

    channel: str
    inbox: str
    epoch: str
    offset: int
    recovered: bool
    earliest_offset: int

    @classmethod
    def from_proto(cls, state: pb.ChannelState) -> ChannelState:
        return cls(state.channel, state.inbox, state.epoch, state.offset, state.recovered,
                   state.earliest_offset)


NotifyItem = Publication | InboxItem | ChannelState | PresenceEvent
"""What a subscription yields."""


@dataclass(frozen=True, slots=True)
class InboxPage:
    """A page of an inbox, oldest first."""

    items: list[InboxItem]
    read_cursor: int
    unread_count: int
    last_cursor: int
    epoch: str


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A page of a channel's history, oldest first."""

    publications: list[Publication]
    epoch: str
    last_offset: int
    earliest_offset: int


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """A channel's numbering and retention (all zero if it was never published to)."""

    epoch: str
    last_offset: int
    earliest_offset: int
    history_size: int
    history_ttl: float
    ephemeral: bool
    """Its history is in its primary's memory only (not replicated)."""
