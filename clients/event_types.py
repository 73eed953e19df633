"""The values the event store client takes and returns, and their wire forms.

Numbering follows ``mesh.events.v1``: versions are 1-based per stream, positions
1-based per slot log; 0 always means "none".
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from clients.durations import duration
from clients.errors import InvalidArgumentError
from clients.requests import build
from mesh.events.v1 import events_pb2 as pb

JSON = "application/json"

Payload = bytes | str | Mapping[str, Any] | list[Any]
"""Event data or metadata: bytes as they are, str as UTF-8, a mapping or list as JSON."""

Positions = dict[int, int]
"""slot -> the last position processed in that slot's log (a resume point)."""


class Expected(enum.Enum):
    """What an append expects of its stream; an ``int`` instead means that exact last version."""

    ANY = pb.EXPECTED_STATE_ANY
    """No check."""
    NO_STREAM = pb.EXPECTED_STATE_NO_STREAM
    """The stream was never written, or is soft-deleted."""
    STREAM_EXISTS = pb.EXPECTED_STATE_STREAM_EXISTS
    """The stream has events (and is not soft-deleted)."""


ANY = Expected.ANY
NO_STREAM = Expected.NO_STREAM
STREAM_EXISTS = Expected.STREAM_EXISTS

ExpectedVersion = Expected | int


class Start(enum.Enum):
    """Where a subscription without a resume point begins."""

    BEGINNING = pb.SUBSCRIBE_START_BEGINNING
    """With the first stored event (full catch-up)."""
    END = pb.SUBSCRIBE_START_END
    """With the first event committed after the subscription is registered."""


BEGINNING = Start.BEGINNING
END = Start.END


def _encode(payload: Payload) -> tuple[bytes, bool]:
    """The bytes of ``payload`` and whether they are JSON."""
    if isinstance(payload, bytes):
        return payload, False
    if isinstance(payload, str):
        return payload.encode(), False
    return json.dumps(payload, separators=(",", ":")).encode(), True


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. ``data`` given as a mapping or list is stored as JSON
    (content type ``application/json``). ``id`` is the idempotency key: keep the
    same NewEvent (so the same id) when retrying an append yourself."""

    type: str
    data: Payload = b""
    metadata: Payload = b""
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    content_type: str = ""
    """Media type of ``data``; empty: JSON for a mapping or list, else octet-stream."""

    def to_proto(self) -> pb.EventData:
        data, is_json = _encode(self.data)
        metadata, _ = _encode(self.metadata)
        content_type = self.content_type or (JSON if is_json else "")
        return build(pb.EventData)(
            id=self.id, type=self.type, data=data, metadata=metadata, content_type=content_type)


def seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored. ``create_time``: Unix seconds of its commit (primary's clock)."""

    stream: str
    version: int
    slot: int
    position: int
    id: str
    type: str
    data: bytes
    metadata: bytes
    content_type: str
    create_time: float

    @classmethod
    def from_proto(cls, e: pb.RecordedEvent) -> RecordedEvent:
        return cls(e.stream, e.version, e.slot, e.position, e.id, e.type, e.data, e.metadata,
                   e.content_type or "application/octet-stream", seconds(e.create_time))

    def json(self) -> Any:
        """``data`` parsed as JSON."""
        return json.loads(self.data)

    def metadata_json(self) -> Any:
        """``metadata`` parsed as JSON (None when empty)."""
        return json.loads(self.metadata) if self.metadata else None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append went. ``duplicate``: every event was already there (an
    idempotent retry); the versions and position are the original ones."""

    first_version: int
    last_version: int
    slot: int
    position: int
    """Position of the last appended event in the slot's log."""
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ReadPage:
    """One page of a stream (or, for ``read_slot``, of a slot's log)."""

    events: list[RecordedEvent]
    next: int
    """Pass as ``from_version`` (``from_position``) for the next page; meaningless at the end."""
    end: bool
    """Nothing further in this direction right now."""
    last: int
    """The stream's last version (the slot's last position); 0 if none."""
    stream_exists: bool = True
    """False if the stream was never written or is soft-deleted (stream reads only)."""


@dataclass(frozen=True, slots=True)
class StreamMetadata:
    """A stream's retention settings (0 / None: no limit) and their version."""

    max_count: int = 0
    max_age: float | None = None
    """Seconds."""
    truncate_before: int = 0
    """Hide events with a lower version (what a soft delete sets)."""
    metadata_version: int = 0
    """0 if never set, then +1 per set_stream_metadata."""

    def to_proto(self) -> pb.StreamMetadata:
        return build(pb.StreamMetadata)(
            max_count=self.max_count, truncate_before=self.truncate_before,
            max_age=duration(self.max_age, "metadata.max_age") if self.max_age else None)


# -- subscription markers ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A resume point: the slots that advanced (slot -> position) since the last one.
    ``Subscription.positions`` holds them all, merged."""

    positions: Positions


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """Every stored event was delivered; the subscription is live from here.
    ``positions`` (category/all) or ``version`` (stream) is the resume point now."""

    positions: Positions
    version: int = 0


@dataclass(frozen=True, slots=True)
class FellBehind:
    """The reader was too slow for the live feed: the node went back to reading the
    store. Nothing is lost or repeated; a CaughtUp follows."""


Marker = Checkpoint | CaughtUp | FellBehind
Item = RecordedEvent | Marker


def expected_fields(expected: ExpectedVersion) -> dict[str, Any]:
    """``expected_state`` / ``exact_version`` of a write request."""
    if isinstance(expected, Expected):
        return {"expected_state": expected.value}
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 1:
        raise InvalidArgumentError(
            f"expected: an exact version is at least 1 (got {expected!r}); use NO_STREAM "
            "for a stream without events", field_violations={"exact_version": "must be >= 1"})
    return {"expected_state": pb.EXPECTED_STATE_EXACT, "exact_version": expected}


# -- slots and positions (pure helpers, unit-tested) ------------------------------------


def to_ranges(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` ranges covering exactly ``slots``."""
    ranges: list[tuple[int, int]] = []
    for slot in sorted(set(slots)):
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return ranges


def merge_positions(into: Positions, advanced: Mapping[int, int]) -> Positions:
    """Merge ``advanced`` into ``into`` (in place), never moving a slot back; returns the
    entries that moved forward."""
    moved: Positions = {}
    for slot, position in advanced.items():
        if position > into.get(slot, 0):
            into[slot] = moved[slot] = position
    return moved
