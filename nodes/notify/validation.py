"""Request validation for notifications: every failure names the offending field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import duration_pb2

from common.bounds import NS_PER_SECOND, check_bytes, duration_ns
from common.errors import invalid_argument
from common.slots import SLOT_COUNT
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_replication_pb2 as npb
from nodes.config import NotifyLimits
from nodes.events.validation import check_stream

__all__ = ["MAX_CHANNELS", "MAX_ID_BYTES", "Wanted", "check_data", "check_id", "check_join",
           "check_name", "check_patterns", "page_size", "presence_ttl", "settings",
           "subscribe_slots", "subscription"]

MAX_ID_BYTES = 128
MAX_CHANNELS = 10_000
"""Channels one Subscribe may name (a resumed pattern subscription names every
channel it found on the node)."""
MAX_PATTERNS = 100
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_USER_BYTES = 1024
MAX_INFO_BYTES = 4096
PRESENCE_TTL = 30 * NS_PER_SECOND
MIN_PRESENCE_TTL = NS_PER_SECOND
MAX_PRESENCE_TTL = 3600 * NS_PER_SECOND


def check_name(name: str, field: str) -> None:
    """A channel name or a user: validated like an event stream id."""
    check_stream(name, field)


def check_data(data: bytes, limits: NotifyLimits, field: str = "data") -> None:
    if len(data) > limits.max_data_bytes:
        raise invalid_argument(field, f"is {len(data)} bytes; the limit is "
                                      f"{limits.max_data_bytes}")


def check_id(value: str, field: str = "idempotency_id") -> None:
    """An id: at most MAX_ID_BYTES (and given, unless it is the idempotency id)."""
    check_bytes(field, value, MAX_ID_BYTES, required=field != "idempotency_id")


def settings(options: pb.HistoryOptions, limits: NotifyLimits, *, inbox: bool = False,
             field: str = "options") -> npb.LogSettings:
    """The retention asked for, the node's defaults filled in, within its bounds."""
    if options.size > limits.max_history_size:
        raise invalid_argument(f"{field}.size",
                               f"must be at most {limits.max_history_size}")
    ttl_ns = duration_ns(f"{field}.ttl", options.ttl)
    max_ttl_ns = int(limits.max_history_ttl * NS_PER_SECOND)
    if ttl_ns > max_ttl_ns:
        raise invalid_argument(f"{field}.ttl",
                               f"must be at most {limits.max_history_ttl:g} seconds")
    default_size, default_ttl = (limits.inbox_size, limits.inbox_ttl) if inbox \
        else (limits.history_size, limits.history_ttl)
    return npb.LogSettings(size=options.size or default_size,
                           ttl_ns=ttl_ns or int(default_ttl * NS_PER_SECOND))


def presence_ttl(ttl: duration_pb2.Duration) -> int:
    """A Join's ttl in nanoseconds: 1 s to 1 hour, 30 s when unset."""
    ttl_ns = duration_ns("ttl", ttl)
    if not ttl_ns:
        return PRESENCE_TTL
    if not MIN_PRESENCE_TTL <= ttl_ns <= MAX_PRESENCE_TTL:
        raise invalid_argument("ttl", "must lie between 1 s and 1 hour")
    return ttl_ns


def check_join(request: pb.JoinRequest) -> None:
    check_name(request.channel, "channel")
    check_id(request.client_id, "client_id")
    check_bytes("user", request.user, MAX_USER_BYTES)
    if len(request.info) > MAX_INFO_BYTES:
        raise invalid_argument("info", f"is {len(request.info)} bytes; the limit is "
                                       f"{MAX_INFO_BYTES}")


def page_size(limit: int) -> int:
    """0 means the default page; more than the maximum is cut to it."""
    return DEFAULT_PAGE if limit == 0 else min(limit, MAX_PAGE)


@dataclass(frozen=True, slots=True)
class Wanted:
    """One log a subscription follows, as asked: its name (as the caller gave it)
    and where to resume (None: from now on)."""

    inbox: bool
    name: str
    since: tuple[int, str] | None
    presence_events: bool = False


def subscription(channels: Sequence[pb.ChannelSubscription], inbox: str,
                 inbox_since: pb.StreamPosition | None, patterns: bool = False
                 ) -> list[Wanted]:
    """The logs a Subscribe names: up to MAX_CHANNELS distinct channels and/or an
    inbox (at least one of them, unless it has ``patterns``)."""
    if not channels and not inbox and not patterns:
        raise invalid_argument("channels", "give at least one channel (or an inbox, or "
                                           "patterns)")
    if len(channels) > MAX_CHANNELS:
        raise invalid_argument("channels", f"has {len(channels)}; the limit is "
                                           f"{MAX_CHANNELS}")
    wanted: list[Wanted] = []
    seen: dict[str, int] = {}
    for i, c in enumerate(channels):
        check_name(c.channel, f"channels[{i}].channel")
        first = seen.setdefault(c.channel, i)
        if first != i:
            raise invalid_argument(f"channels[{i}].channel", f"repeats channels[{first}]")
        since = (c.since.offset, c.since.epoch) if c.HasField("since") else None
        wanted.append(Wanted(False, c.channel, since, c.presence_events))
    if inbox:
        check_name(inbox, "inbox")
        since = (inbox_since.offset, inbox_since.epoch) if inbox_since is not None else None
        wanted.append(Wanted(True, inbox, since))
    return wanted


def check_patterns(patterns: Sequence[str]) -> list[tuple[str, ...]]:
    """Channel patterns as token tuples: "*" is one token, ">" (last) the rest."""
    if len(patterns) > MAX_PATTERNS:
        raise invalid_argument("patterns", f"has {len(patterns)}; the limit is {MAX_PATTERNS}")
    parsed = []
    for i, pattern in enumerate(patterns):
        field = f"patterns[{i}]"
        check_name(pattern, field)
        tokens = tuple(pattern.split("."))
        if not all(tokens):
            raise invalid_argument(field, "tokens (between dots) must not be empty")
        if ">" in tokens[:-1]:
            raise invalid_argument(field, "'>' may only be the last token")
        parsed.append(tokens)
    return parsed


def subscribe_slots(ranges: Sequence[pb.SlotRange]) -> list[int]:
    """The slots a pattern subscription covers (every slot when none given)."""
    if not ranges:
        return list(range(SLOT_COUNT))
    slots: set[int] = set()
    for i, r in enumerate(ranges):
        if not r.start <= r.end < SLOT_COUNT:
            raise invalid_argument(f"slots[{i}]", f"need start <= end <= {SLOT_COUNT - 1} "
                                                  f"(got {r.start}..{r.end})")
        slots.update(range(r.start, r.end + 1))
    return sorted(slots)
