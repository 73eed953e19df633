"""Reading a group's events as clients may see them: committed and not hidden.

A `View` fixes the commit point and the clock for one read, so one page is
consistent: an event shows if its append is committed, its stream is not
tombstoned, retention (truncate_before, max_count, max_age) keeps it, and it
belongs to the reader's tenant (slot logs hold every tenant's events).
Pages are bounded by count, by bytes, and by entries scanned, so that a long
run of hidden events never makes one call expensive.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from common import tenancy
from common.tenancy import unscoped
from mesh.events.v1 import events_pb2 as pb
from nodes.events.model import (
    CREATED_NS,
    POSITION,
    SEQ,
    STREAM,
    VERSION,
    SlotLog,
    StoredEvent,
    Stream,
    event_size,
)
from nodes.events.store import EventStore
from nodes.pages import MAX_PAGE_BYTES

__all__ = ["Page", "View", "read_slot", "read_stream", "record", "recorded"]

MAX_SCAN = 10_000
"""Entries one page looks at, at most (hidden ones included)."""
_OCTET_STREAM = "application/octet-stream"
_NO_AGE_LIMIT = -(1 << 63)


@dataclass(frozen=True, slots=True)
class Page:
    """Events in reading order; ``next`` is where the following page starts."""

    events: list[StoredEvent]
    next: int
    end: bool


class View:
    """What readers see of one store at one commit point and instant."""

    __slots__ = ("_bounds", "commit_seq", "now_ns", "store", "tenant_prefix")

    def __init__(self, store: EventStore, commit_seq: int, now_ns: int) -> None:
        self.store = store
        self.commit_seq = commit_seq
        self.now_ns = now_ns
        self.tenant_prefix = tenancy.prefix()
        self._bounds: dict[str, tuple[int, int, int]] = {}

    def bounds(self, stream: Stream) -> tuple[int, int, int]:
        """``(floor, last, oldest)``: visible versions are floor..last, created at
        or after ``oldest`` (ns)."""
        found = self._bounds.get(stream.stream_id)
        if found is None:
            last = stream.committed_last(self.commit_seq)
            floor = last + 1 if stream.tombstoned else stream.floor(last)
            oldest = self.now_ns - stream.max_age_ns if stream.max_age_ns else _NO_AGE_LIMIT
            found = self._bounds[stream.stream_id] = (floor, last, oldest)
        return found

    def visible(self, event: StoredEvent) -> bool:
        if event[SEQ] > self.commit_seq or not event[STREAM].startswith(self.tenant_prefix):
            return False
        stream = self.store.streams.get(event[STREAM])
        if stream is None or not stream.holds(event):
            return False
        floor, last, oldest = self.bounds(stream)
        return floor <= event[VERSION] <= last and event[CREATED_NS] >= oldest


def read_stream(stream: Stream, view: View, from_version: int | None, backward: bool,
                limit: int, max_bytes: int = MAX_PAGE_BYTES) -> Page:
    """A page of one stream's visible events."""
    floor, last, oldest = view.bounds(stream)
    first = stream.events[0][VERSION] if stream.events else last + 1
    low = max(floor, first)
    out: list[StoredEvent] = []
    size = scanned = 0
    if not backward:
        version = low if from_version is None else max(from_version, low)
        while version <= last and len(out) < limit and scanned < MAX_SCAN:
            event = stream.at(version)
            scanned += 1
            if event is not None and event[CREATED_NS] >= oldest:
                if out and size + event_size(event) > max_bytes:
                    break
                out.append(event)
                size += event_size(event)
            version += 1
        return Page(out, version, version > last)
    version = last if from_version is None else min(from_version, last)
    while version >= low and len(out) < limit and scanned < MAX_SCAN:
        event = stream.at(version)
        scanned += 1
        if event is not None and event[CREATED_NS] >= oldest:
            if out and size + event_size(event) > max_bytes:
                break
            out.append(event)
            size += event_size(event)
        version -= 1
    return Page(out, max(version, 0), version < low)


def read_slot(log: SlotLog, view: View, from_position: int | None, backward: bool,
              limit: int, max_bytes: int = MAX_PAGE_BYTES) -> Page:
    """A page of one slot's log: the visible events of all its streams."""
    entries = log.entries
    end = log.committed_end(view.commit_seq)
    out: list[StoredEvent] = []
    size = scanned = 0
    if not backward:
        i = 0 if from_position is None else log.index_at(from_position)
        while i < end and len(out) < limit and scanned < MAX_SCAN:
            event = entries[i]
            scanned += 1
            if view.visible(event):
                if out and size + event_size(event) > max_bytes:
                    break
                out.append(event)
                size += event_size(event)
            i += 1
        if i < end:
            return Page(out, entries[i][POSITION], False)
        return Page(out, log.committed_last(view.commit_seq) + 1, True)
    i = end - 1 if from_position is None else min(log.index_after(from_position), end) - 1
    while i >= 0 and len(out) < limit and scanned < MAX_SCAN:
        event = entries[i]
        scanned += 1
        if view.visible(event):
            if out and size + event_size(event) > max_bytes:
                break
            out.append(event)
            size += event_size(event)
        i -= 1
    return Page(out, entries[i][POSITION] if i >= 0 else 0, i < 0)


def record(message: pb.RecordedEvent, event: StoredEvent) -> None:
    """Write a stored event's wire form into ``message``: a response's own field
    (``events.add()``, ``event``), filled where it is. A RecordedEvent built first
    is copied again when a response takes it; filling in place halves what a
    100-event page costs to build (233 -> 108 us)."""
    stream, version, slot, position, event_id, type_, data, metadata, content_type, \
        created_ns, _ = event
    message.stream = unscoped(stream)
    message.version = version
    message.slot = slot
    message.position = position
    message.id = event_id
    message.type = type_
    message.data = data
    message.metadata = metadata
    message.content_type = content_type or _OCTET_STREAM
    created = message.create_time
    created.seconds, created.nanos = divmod(created_ns, 1_000_000_000)


def recorded(events: Iterable[StoredEvent], into: RepeatedCompositeFieldContainer[
        pb.RecordedEvent]) -> None:
    """Append the wire form of each of ``events`` to ``into`` (a response's events)."""
    add = into.add
    for event in events:
        record(add(), event)
