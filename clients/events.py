"""Typed event store calls: ``await mesh.events.append("order-42", [NewEvent(...)])``.

A stream id routes like a cache key (the CRC16 slot of the id or of its
``{tag}``), so a stream lives on its slot's primary. Each slot keeps one log of
the events of all its streams, ordered by position; there is no global order
across slots.

Retries (see ``clients.retry``): reads are always safe to repeat, and so is an
append, because the store recognises a repeated append by its event ids and
answers it again with the original versions (``AppendResult.duplicate``).
Conditional deletes and tombstones are retried only when certainly not executed.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from clients.coalesce import BATCH_BYTES, CoalescedCall, in_batch
from clients.errors import (
    InvalidArgumentError,
    MeshError,
    NoNodesError,
    VersionMismatchError,
    WrongExpectedVersionError,
    mesh_error,
)
from clients.event_subscription import Subscription, SubscriptionTarget
from clients.event_types import (
    ANY,
    BEGINNING,
    END,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    CaughtUp,
    Checkpoint,
    Expected,
    ExpectedVersion,
    FellBehind,
    Item,
    NewEvent,
    Positions,
    ReadPage,
    RecordedEvent,
    Start,
    StreamMetadata,
    expected_fields,
)
from clients.requests import build
from clients.retry import with_retries
from common.slots import SLOT_COUNT
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh

__all__ = [
    "ANY", "BEGINNING", "END", "NO_STREAM", "STREAM_EXISTS", "AppendResult", "CaughtUp",
    "Checkpoint", "EventsClient", "Expected", "FellBehind", "Item", "NewEvent", "Positions",
    "ReadPage", "RecordedEvent", "Start", "StreamMetadata", "Subscription",
]

log = logging.getLogger(__name__)

SERVICE = "events"
PAGE = 100
"""Events per page when none is asked for (the node's default)."""
_PROBE = "\x00mesh:no-such-category\x00"
"""A category no stream id starts with: subscribing to it only scans the logs."""


def _wrong_version(exc: VersionMismatchError) -> WrongExpectedVersionError:
    error = WrongExpectedVersionError(exc.message, code=exc.code, reason=exc.reason,
                                      metadata=exc.metadata)
    error.address = exc.address
    return error


_BATCH = 1000
"""Appends of one AppendMany at most (the node's limit)."""
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _item_error(item: pb.ItemError, address: str) -> MeshError:
    """An AppendMany item's error as Append would have raised it (its fields named
    as in an AppendRequest: ``events[0].id``, not ``appends[3].events[0].id``)."""
    violations = {field.split("].", 1)[1] if field.startswith("appends[") and "]." in field
                  else field: why for field, why in item.field_violations.items()}
    error = mesh_error(_CODES.get(item.code, grpc.StatusCode.UNKNOWN), item.message,
                       item.reason, item.metadata, violations, address)
    return _wrong_version(error) if isinstance(error, VersionMismatchError) else error


class EventsClient:
    """The event store, spread over the mesh's nodes. Every call takes ``timeout=``."""

    def __init__(self, mesh: Mesh, *, coalesce: bool = True) -> None:
        self._mesh = mesh
        self.coalesce = coalesce
        """Send concurrent appends for one node as one AppendMany (``clients.coalesce``);
        two appends to one stream never share a call (their order matters)."""
        # Event ids make a repeat safe: an append sent again alone is a duplicate.
        self._append = CoalescedCall[pb.AppendRequest, pb.AppendResponse, pb.ItemError](
            owner=lambda r: self._owner(r.stream) if self.coalesce else None,
            alone=self._append_alone, many=self._append_many, refusal=pb.ItemError,
            error=_item_error, timeout=lambda: mesh.timeout, max_batch=_BATCH,
            key=lambda r: r.stream, size=in_batch,
            max_bytes=mesh.max_message_bytes - BATCH_BYTES)

    async def _rpc(self, address: str, method: str, request: Any, budget: float) -> Any:
        return await self._mesh.call(pb_grpc.EventsServiceStub, address, method, request, budget)

    async def _call(self, stream: str, method: str, request: Any, timeout: float | None,
                    safe: bool = True, writes: bool = False) -> Any:
        """One unary call to the primary of ``stream``'s slot. ``writes``: a
        VERSION_MISMATCH is about the stream's expected version."""

        async def attempt(budget: float, address: str | None) -> Any:
            address = address or self._mesh.route(SERVICE, stream).address
            try:
                return await self._rpc(address, method, request, budget)
            except VersionMismatchError as exc:
                if writes:
                    raise _wrong_version(exc) from None
                raise

        return await with_retries(self._mesh, attempt, timeout=timeout, safe=safe)

    # -- writing ---------------------------------------------------------------

    async def append(
        self, stream: str, events: NewEvent | Iterable[NewEvent],
        expected: ExpectedVersion = ANY, *, timeout: float | None = None,
    ) -> AppendResult:
        """Append ``events`` to ``stream``, atomically, if ``expected`` holds: ANY,
        NO_STREAM, STREAM_EXISTS, or the exact last version (an int >= 1).

        Raises WrongExpectedVersionError (``current_version``, ``stream_exists``),
        DuplicateEventIdError, StreamDeletedError (tombstoned), InvalidArgumentError.
        """
        batch = [events] if isinstance(events, NewEvent) else list(events)
        for i, event in enumerate(batch):
            if not isinstance(event, NewEvent):
                raise TypeError(f"events[{i}]: a NewEvent, not {type(event).__name__}")
        request = build(pb.AppendRequest)(
            stream=stream, events=[e.to_proto() for e in batch], **expected_fields(expected))
        r = await self._append(request, timeout)
        return AppendResult(r.first_version, r.last_version, r.slot, r.position, r.duplicate)

    def _owner(self, stream: str) -> str | None:
        """The address of ``stream``'s primary if the map names one, else None."""
        try:
            target = self._mesh.route(SERVICE, stream)
        except NoNodesError:
            return None
        return target.address if target.owner else None

    async def _append_alone(self, request: pb.AppendRequest, timeout: float | None
                            ) -> pb.AppendResponse:
        r: pb.AppendResponse = await self._call(request.stream, "Append", request, timeout,
                                                writes=True)
        return r

    async def _append_many(self, address: str, requests: list[pb.AppendRequest],
                           budget: float) -> list[pb.AppendResponse | pb.ItemError]:
        r = await self._rpc(address, "AppendMany", pb.AppendManyRequest(appends=requests),
                            budget)
        return [item.appended if item.HasField("appended") else item.error
                for item in r.results]

    async def delete_stream(self, stream: str, expected: ExpectedVersion = ANY, *,
                            timeout: float | None = None) -> int:
        """Soft-delete ``stream`` (an append recreates it, versions going on); returns
        its last version (0: it did not exist)."""
        request = build(pb.DeleteStreamRequest)(stream=stream, **expected_fields(expected))
        r = await self._call(stream, "DeleteStream", request, timeout,
                             safe=expected is ANY, writes=True)
        return int(r.last_version)

    async def tombstone_stream(self, stream: str, expected: ExpectedVersion = ANY, *,
                               timeout: float | None = None) -> int:
        """Hard-delete ``stream`` for ever (later reads and appends raise
        StreamDeletedError); returns its last version. Not retried after an unknown
        outcome: a second tombstone fails with StreamDeletedError."""
        request = build(pb.TombstoneStreamRequest)(stream=stream, **expected_fields(expected))
        r = await self._call(stream, "TombstoneStream", request, timeout, safe=False,
                             writes=True)
        return int(r.last_version)

    # -- metadata ------------------------------------------------------------------

    async def get_stream_metadata(self, stream: str, *,
                                  timeout: float | None = None) -> StreamMetadata:
        """``stream``'s retention settings (all zero if never set)."""
        r = await self._call(stream, "GetStreamMetadata",
                             pb.GetStreamMetadataRequest(stream=stream), timeout)
        m = r.metadata
        max_age = m.max_age.ToNanoseconds() / 1e9 if m.HasField("max_age") else 0.0
        return StreamMetadata(m.max_count, max_age or None, m.truncate_before,
                              r.metadata_version)

    async def set_stream_metadata(
        self, stream: str, *, max_count: int = 0, max_age: float | None = None,
        truncate_before: int = 0, expected_metadata_version: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Replace ``stream``'s retention settings (max_age in seconds); returns their
        new version. With ``expected_metadata_version`` (0: never set), raises
        VersionMismatchError (``current_version``) if they changed meanwhile."""
        settings = StreamMetadata(max_count, max_age, truncate_before)
        request = build(pb.SetStreamMetadataRequest)(
            stream=stream, metadata=settings.to_proto(),
            expected_metadata_version=expected_metadata_version)
        r = await self._call(stream, "SetStreamMetadata", request, timeout,
                             safe=expected_metadata_version is None)
        return int(r.metadata_version)

    # -- reading -------------------------------------------------------------------

    async def read(
        self, stream: str, from_version: int | None = None, *, backward: bool = False,
        max_count: int = PAGE, timeout: float | None = None,
    ) -> ReadPage:
        """One page of ``stream`` from ``from_version`` (inclusive; None: its first
        event, or its last when ``backward``). A missing stream reads as empty."""
        request = build(pb.ReadRequest)(
            stream=stream, max_count=max_count, from_version=from_version,
            direction=pb.READ_DIRECTION_BACKWARD if backward else pb.READ_DIRECTION_FORWARD)
        r = await self._call(stream, "Read", request, timeout)
        return ReadPage([RecordedEvent.from_proto(e) for e in r.events], r.next_version,
                        r.end_of_stream, r.last_version, r.stream_exists)

    async def read_stream(
        self, stream: str, from_version: int | None = None, *, backward: bool = False,
        page_size: int = PAGE, timeout: float | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event of ``stream`` from ``from_version`` on, page by page
        (``timeout`` bounds each page)."""
        while True:
            page = await self.read(stream, from_version, backward=backward,
                                   max_count=page_size, timeout=timeout)
            for event in page.events:
                yield event
            if page.end or not page.events:
                return
            from_version = page.next

    async def read_slot(
        self, slot: int, from_position: int | None = None, *, backward: bool = False,
        max_count: int = PAGE, timeout: float | None = None,
    ) -> ReadPage:
        """One page of ``slot``'s log (every stream of the slot, by position), from
        ``from_position`` inclusive."""
        request = build(pb.ReadAllRequest)(
            slot=slot, max_count=max_count, from_position=from_position,
            direction=pb.READ_DIRECTION_BACKWARD if backward else pb.READ_DIRECTION_FORWARD)

        async def attempt(budget: float, address: str | None) -> Any:
            address = address or self._mesh.route_slot(SERVICE, slot).address
            return await self._rpc(address, "ReadAll", request, budget)

        r = await with_retries(self._mesh, attempt, timeout=timeout, safe=True)
        return ReadPage([RecordedEvent.from_proto(e) for e in r.events], r.next_position,
                        r.end_of_log, r.last_position)

    async def read_all(
        self, *, slots: Iterable[int] | None = None, page_size: int = PAGE,
        concurrency: int = 32, timeout: float | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Every stored event of every slot (or of ``slots``), merged by
        ``(create_time, slot, position)``.

        There is no global order: each slot's events come in position order, and
        slots are interleaved by commit time on their primaries' clocks, which is
        only roughly comparable across nodes.

        Cost: without ``slots``, first one category subscription per owner that
        matches no stream, only to learn from its CaughtUp which slots have a log
        (the nodes scan their logs; no event is sent); then one ReadAll per
        non-empty slot, ``concurrency`` at a time, and one per further page. If
        that subscription fails, every slot is read (16384 calls: seconds even on a
        small mesh). Keeps one page per non-empty slot in memory. Use
        ``subscribe(all=True)`` to follow everything continuously.
        """
        wanted = sorted(set(slots)) if slots is not None else await self._slots_with_logs(timeout)
        gate = asyncio.Semaphore(concurrency)

        async def first(slot: int) -> tuple[int, ReadPage]:
            async with gate:
                return slot, await self.read_slot(slot, max_count=page_size, timeout=timeout)

        pages = await asyncio.gather(*(first(slot) for slot in wanted))
        buffers: dict[int, tuple[deque[RecordedEvent], ReadPage]] = {}
        heap: list[tuple[float, int, int, RecordedEvent]] = []
        for slot, page in pages:
            if page.events:
                buffers[slot] = (deque(page.events), page)
                head = buffers[slot][0].popleft()
                heap.append((head.create_time, slot, head.position, head))
        heapq.heapify(heap)
        while heap:
            *_, event = heapq.heappop(heap)
            yield event
            slot = event.slot
            buffer, page = buffers[slot]
            if not buffer and not page.end:
                page = await self.read_slot(slot, page.next, max_count=page_size,
                                            timeout=timeout)
                buffers[slot] = (buffer, page)
                buffer.extend(e for e in page.events if e.position > event.position)
            if buffer:
                head = buffer.popleft()
                heapq.heappush(heap, (head.create_time, slot, head.position, head))

    async def _slots_with_logs(self, timeout: float | None) -> list[int]:
        """The slots whose log is not empty; every slot if the nodes cannot say."""
        try:
            async with self.subscribe(category=_PROBE, include_markers=True,
                                      timeout=timeout) as probe:
                async for item in probe:
                    if isinstance(item, CaughtUp):
                        return sorted(item.positions)
        except MeshError as exc:
            log.debug("cannot list the non-empty slots (%s); reading every slot", exc)
        return list(range(SLOT_COUNT))

    # -- following -------------------------------------------------------------------

    def subscribe(
        self, stream: str | None = None, *, category: str | None = None, all: bool = False,
        after_version: int = 0, after_positions: Mapping[int, int] | None = None,
        start: Start = BEGINNING, include_markers: bool = False,
        checkpoint_interval: int = 0, timeout: float | None = None,
        heartbeat_interval: float | None = None,
    ) -> Subscription:
        """Follow one ``stream``, a ``category`` (stream id prefix) or ``all`` streams:
        stored events first (catch-up), then new ones as they are committed.

        Resume points: ``after_version`` (stream: the last version processed) or
        ``after_positions`` (category/all: slot -> last position processed, i.e. a
        previous ``Subscription.positions``). Without one, ``start`` says where to
        begin. ``include_markers`` also yields Checkpoint, CaughtUp and FellBehind.

        ``async with mesh.events.subscribe(category="order-") as sub:
        async for event in sub: ...``. Entering returns once every node confirmed
        (``timeout`` bounds that). Broken parts are resubscribed on their owners
        from where they stopped, so nothing is missed or repeated; a part whose
        node goes silent for 3 heartbeat intervals counts as broken
        (``heartbeat_interval``: ask the nodes for this interval instead of their
        own setting). An error that retrying cannot fix ends the iteration.
        """
        if [stream is not None, category is not None, all].count(True) != 1:
            raise InvalidArgumentError(
                "give exactly one of stream, category or all=True",
                field_violations={"target": "exactly one of stream, category, all"})
        target = SubscriptionTarget(stream=stream, category=category)
        return Subscription(self._mesh, target, after_version=after_version,
                            after_positions=dict(after_positions or {}), start=start,
                            include_markers=include_markers,
                            checkpoint_interval=checkpoint_interval, timeout=timeout,
                            heartbeat_interval=heartbeat_interval)

