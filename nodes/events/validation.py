"""Request validation for the event store: every failure names the offending field."""

from __future__ import annotations

from collections.abc import Sequence

from common.bounds import duration_ns
from common.errors import invalid_argument
from common.slots import SLOT_COUNT
from common.tenancy import SEPARATOR
from mesh.events.v1 import events_pb2 as pb
from nodes.config import EventsLimits

__all__ = ["MAX_PAGE", "check_events", "check_expected", "check_metadata", "check_slot",
           "check_stream", "direction", "page_size", "subscribe_slots"]

MAX_STREAM_BYTES = 1024
MAX_ID_BYTES = 128
MAX_TYPE_BYTES = 256
MAX_CONTENT_TYPE_BYTES = 128
DEFAULT_PAGE = 100
MAX_PAGE = 1000
_MAX_INT = (1 << 63) - 1  # what the disk (sqlite INTEGER) holds


def _too_long(text: str, limit: int) -> bool:
    # Most strings are short ASCII: skip the encode when even 4 bytes/char fit.
    return len(text) * 4 > limit and len(text.encode()) > limit


def check_stream(stream: str, field: str = "stream") -> None:
    if not stream:
        raise invalid_argument(field, "must not be empty")
    if _too_long(stream, MAX_STREAM_BYTES):
        raise invalid_argument(field, f"must be at most {MAX_STREAM_BYTES} bytes")
    if SEPARATOR in stream:
        raise invalid_argument(field, "must not contain the byte 0x1F (it separates tenants)")


def check_events(events: Sequence[pb.EventData], limits: EventsLimits) -> None:
    """1..max events with distinct ids, each with a type and within the size limits."""
    if not events:
        raise invalid_argument("events", "must not be empty")
    if len(events) > limits.max_append_events:
        raise invalid_argument(
            "events", f"has {len(events)} events; the limit is {limits.max_append_events}")
    seen: dict[str, int] = {}
    total = 0
    for i, e in enumerate(events):
        if not e.id:
            raise invalid_argument(f"events[{i}].id", "must not be empty")
        if _too_long(e.id, MAX_ID_BYTES):
            raise invalid_argument(f"events[{i}].id", f"must be at most {MAX_ID_BYTES} bytes")
        first = seen.setdefault(e.id, i)
        if first != i:
            raise invalid_argument(f"events[{i}].id", f"repeats events[{first}].id")
        if not e.type:
            raise invalid_argument(f"events[{i}].type", "must not be empty")
        if _too_long(e.type, MAX_TYPE_BYTES):
            raise invalid_argument(f"events[{i}].type",
                                   f"must be at most {MAX_TYPE_BYTES} bytes")
        if _too_long(e.content_type, MAX_CONTENT_TYPE_BYTES):
            raise invalid_argument(f"events[{i}].content_type",
                                   f"must be at most {MAX_CONTENT_TYPE_BYTES} bytes")
        size = len(e.data) + len(e.metadata)
        if size > limits.max_event_bytes:
            raise invalid_argument(
                f"events[{i}].data", f"data + metadata is {size} bytes; the limit is "
                f"{limits.max_event_bytes} per event")
        total += size
    if total > limits.max_append_bytes:
        raise invalid_argument(
            "events", f"data + metadata of all events is {total} bytes; the limit is "
            f"{limits.max_append_bytes} per append")


def check_expected(state: int, exact_version: int, prefix: str = "") -> int:
    """The expected state (UNSPECIFIED meaning ANY); EXACT needs a version >= 1."""
    if state not in pb.ExpectedState.values():
        raise invalid_argument(f"{prefix}expected_state", f"unknown state {state}")
    if state == pb.EXPECTED_STATE_EXACT and exact_version == 0:
        raise invalid_argument(f"{prefix}exact_version",
                               "must be at least 1 with EXPECTED_STATE_EXACT "
                               "(use EXPECTED_STATE_NO_STREAM for an empty stream)")
    return pb.EXPECTED_STATE_ANY if state == pb.EXPECTED_STATE_UNSPECIFIED else state


def direction(value: int) -> bool:
    """Whether the read goes backward."""
    if value not in pb.ReadDirection.values():
        raise invalid_argument("direction", f"unknown direction {value}")
    return value == pb.READ_DIRECTION_BACKWARD


def page_size(max_count: int) -> int:
    """0 means the default page; more than the maximum is cut to it."""
    return DEFAULT_PAGE if max_count == 0 else min(max_count, MAX_PAGE)


def check_slot(slot: int, field: str = "slot") -> None:
    if slot >= SLOT_COUNT:
        raise invalid_argument(field, f"must be below {SLOT_COUNT}")


def subscribe_slots(ranges: Sequence[pb.SlotRange]) -> list[int]:
    """The slots a category/all subscription reads (every slot when none given)."""
    if not ranges:
        return list(range(SLOT_COUNT))
    slots: set[int] = set()
    for i, r in enumerate(ranges):
        if not r.start <= r.end < SLOT_COUNT:
            raise invalid_argument(f"slots[{i}]",
                                   f"need start <= end <= {SLOT_COUNT - 1} "
                                   f"(got {r.start}..{r.end})")
        slots.update(range(r.start, r.end + 1))
    return sorted(slots)


def check_metadata(metadata: pb.StreamMetadata) -> tuple[int, int, int]:
    """``(max_count, max_age_ns, truncate_before)`` of valid settings."""
    max_age_ns = duration_ns("metadata.max_age", metadata.max_age)
    for name, value in (("max_count", metadata.max_count),
                        ("truncate_before", metadata.truncate_before)):
        if value > _MAX_INT:
            raise invalid_argument(f"metadata.{name}", f"must be at most {_MAX_INT}")
    return metadata.max_count, max_age_ns, metadata.truncate_before
