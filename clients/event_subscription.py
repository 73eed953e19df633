"""``mesh.events.subscribe(...)``: catch-up then live events, kept going across failovers.

A stream subscription is one Subscribe to the stream's owner. A category or
all subscription covers the 16384 slots: they are split by owner (one
Subscribe per primary, naming its slot ranges) and the streams merged into one
iterator. Per part, the client remembers how far it has received (a stream's
version, or slot -> position from events and Checkpoint messages); when a part
breaks (UNAVAILABLE, WRONG_OWNER, connection loss, a stream that ends), its slots
are planned again on the refreshed map and resubscribed from those points, so
nothing is missed or repeated.

One gap remains possible: with ``start=END``, a slot that breaks before its first
CaughtUp or event (so before any position is known for it) resumes at the new
end, skipping what was committed in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from clients.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    MeshError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
)
from clients.event_types import (
    BEGINNING,
    CaughtUp,
    Checkpoint,
    FellBehind,
    Item,
    Positions,
    RecordedEvent,
    Start,
    merge_positions,
    to_ranges,
)
from clients.retry import Backoff, Verdict, classify
from common.slots import SLOT_COUNT, slot_for
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh

log = logging.getLogger(__name__)

SERVICE = "events"
ALL_SLOTS = frozenset(range(SLOT_COUNT))
_BACKOFF = Backoff(initial=0.05, maximum=2.0)


@dataclass(frozen=True, slots=True)
class SubscriptionTarget:
    """One stream, a category (id prefix), or, with neither, every stream."""

    stream: str | None = None
    category: str | None = None

    def __str__(self) -> str:
        if self.stream is not None:
            return f"stream {self.stream!r}"
        return f"category {self.category!r}" if self.category is not None else "all streams"


def split_by_owner(slots: Iterable[int],
                   owner: Callable[[int], str]) -> dict[str, list[tuple[int, int]]]:
    """``slots`` grouped by ``owner(slot)`` (an address), as inclusive ranges."""
    by_owner: dict[str, list[int]] = {}
    for slot in sorted(set(slots)):
        by_owner.setdefault(owner(slot), []).append(slot)
    return {address: to_ranges(share) for address, share in by_owner.items()}


def retryable(error: MeshError) -> bool:
    """Whether a broken part is worth subscribing again (elsewhere, or after a pause)."""
    if isinstance(error, DeadlineExceededError | ResourceExhaustedError):
        return True
    return classify(error) is not Verdict.FINAL


# What pumps put on the queue besides events and Checkpoints.
@dataclass(frozen=True, slots=True)
class _PartCaughtUp:
    slots: frozenset[int]
    positions: Positions
    version: int


@dataclass(frozen=True, slots=True)
class _PartFellBehind:
    slots: frozenset[int]


class _Closed:
    pass


_CLOSED = _Closed()
_Queued = RecordedEvent | Checkpoint | _PartCaughtUp | _PartFellBehind | BaseException | _Closed


class Subscription:
    """An async iterator of events (and, with ``include_markers``, Checkpoint,
    CaughtUp and FellBehind), from ``EventsClient.subscribe``.

    ``version`` (stream) and ``positions`` (category/all: slot -> position) are the
    resume point after the last item taken; pass them back as ``after_version`` /
    ``after_positions`` to continue exactly there. Use ``async with`` or call
    ``close()``.
    """

    def __init__(
        self, mesh: Mesh, target: SubscriptionTarget, *, after_version: int,
        after_positions: Positions, start: Start, include_markers: bool,
        checkpoint_interval: int, timeout: float | None, buffer: int = 1000,
    ) -> None:
        self._mesh = mesh
        self.target = target
        self.version = after_version
        self.positions: Positions = {s: p for s, p in after_positions.items() if p > 0}
        self._start = start
        self._markers = include_markers
        self._checkpoint_interval = checkpoint_interval
        self._timeout = timeout
        self._slots = (frozenset({slot_for(target.stream)}) if target.stream is not None
                       else ALL_SLOTS)
        # What the pumps have received: where a broken part resumes.
        self._fetched_version = after_version
        self._fetched: Positions = dict(self.positions)
        # Slots whose resume point is known (else a restart would obey `start` again).
        self._anchored: set[int] = set(self._slots) if (
            start is BEGINNING or after_version > 0) else set(self.positions)
        self._homeless: set[int] = set(self._slots)
        self._unconfirmed: set[int] = set(self._slots)
        self._parts: set[asyncio.Task[None]] = set()
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=buffer)
        self._wake = asyncio.Event()
        self._confirmed = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._failures = 0
        self._last_error: MeshError | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._live: set[int] = set()
        self._live_signalled = False

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> Subscription:
        """Subscribe; returns once every part is confirmed by its node. Raises the
        last error if that does not happen within the timeout."""
        if self._closed:
            return self
        if self._supervisor is None:
            self._wake.set()
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"subscription:{self.target}")
        budget = self._mesh.timeout if self._timeout is None else self._timeout
        try:
            await asyncio.wait_for(self._confirmed.wait(), budget)
        except TimeoutError:
            await self.close()
            if self._last_error is not None:
                raise self._last_error from None
            raise DeadlineExceededError(f"subscription to {self.target} not confirmed in time",
                                        code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        if self._error is not None:
            error, self._error = self._error, None
            await self.close()
            raise error
        return self

    async def close(self) -> None:
        """Stop every part; iteration then ends."""
        self._closed = True
        self._confirmed.set()  # a start() still waiting returns
        tasks = [*self._parts, *([self._supervisor] if self._supervisor else [])]
        self._parts.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_CLOSED)

    async def __aenter__(self) -> Subscription:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def buffered(self) -> int:
        """Items received and not yet taken."""
        return self._queue.qsize()

    # -- consuming -------------------------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        if self._supervisor is None and not self._closed:
            await self.start()
        while True:
            if self._queue.empty():
                if self._error is not None:
                    error, self._error = self._error, None
                    await self.close()
                    raise error
                if self._closed:
                    raise StopAsyncIteration
            item = await self._queue.get()
            if isinstance(item, _Closed):
                raise StopAsyncIteration
            if isinstance(item, BaseException):
                self._error = None
                await self.close()
                raise item
            shown = self._take(item)
            if shown is not None:
                return shown

    def _take(self, item: _Queued) -> Item | None:
        """Advance the resume point past ``item``; what to hand out, if anything."""
        if isinstance(item, RecordedEvent):
            if self.target.stream is not None:
                self.version = max(self.version, item.version)
            merge_positions(self.positions, {item.slot: item.position})
            return item
        if isinstance(item, Checkpoint):
            merge_positions(self.positions, item.positions)
            return item if self._markers else None
        if isinstance(item, _PartCaughtUp):
            merge_positions(self.positions, item.positions)
            self.version = max(self.version, item.version)
            self._live |= item.slots
            if self._live_signalled or not self._live >= self._slots:
                return None
            self._live_signalled = True
            return CaughtUp(dict(self.positions), self.version) if self._markers else None
        if isinstance(item, _PartFellBehind):
            self._live -= item.slots
            was, self._live_signalled = self._live_signalled, False
            return FellBehind() if self._markers and was else None
        return None

    # -- parts -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Subscribe the slots without a part, whenever there are some."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._failures:
                await asyncio.sleep(_BACKOFF.delay(self._failures - 1))
                await self._mesh.refresh()
            homeless, self._homeless = self._homeless, set()
            if not homeless:
                continue
            try:
                plan = self._plan(homeless)
            except MeshError as exc:  # no node known at all
                self._broken(frozenset(homeless), exc)
                continue
            for address, slots, request in plan:
                task = asyncio.get_running_loop().create_task(
                    self._pump(address, slots, request), name=f"subscription-part:{address}")
                self._parts.add(task)
                task.add_done_callback(self._parts.discard)

    def _plan(self, slots: set[int]) -> list[tuple[str, frozenset[int], pb.SubscribeRequest]]:
        """One request per owner (and per kind of start) for ``slots``."""
        if self.target.stream is not None:
            address = self._mesh.route(SERVICE, self.target.stream).address
            return [(address, frozenset(slots), self._request(slots))]
        if self._mesh.table is None:  # fixed addresses: one node, which must own them all
            owners = {self._mesh.any_node(SERVICE).address: to_ranges(slots)}
        else:
            owners = split_by_owner(
                slots, lambda slot: self._mesh.route_slot(SERVICE, slot).address)
        plan = []
        for address, ranges in owners.items():
            share = {s for start, end in ranges for s in range(start, end + 1)}
            for group in (share & self._anchored, share - self._anchored):
                if group:
                    plan.append((address, frozenset(group), self._request(group)))
        return plan

    def _request(self, slots: set[int]) -> pb.SubscribeRequest:
        anchored = slots <= self._anchored
        start = BEGINNING.value if anchored else self._start.value
        if self.target.stream is not None:
            return pb.SubscribeRequest(stream=self.target.stream, start=start,
                                       after_version=self._fetched_version)
        request = pb.SubscribeRequest(start=start, checkpoint_interval=self._checkpoint_interval)
        if self.target.category is not None:
            request.category = self.target.category
        else:
            request.all.SetInParent()
        if not (self._mesh.table is None and slots == ALL_SLOTS):  # empty = every slot
            request.slots.extend(pb.SlotRange(start=a, end=b) for a, b in to_ranges(slots))
        for slot in slots:
            position = self._fetched.get(slot, 0)
            if position:
                request.after_positions[slot] = position
        return request

    async def _pump(self, address: str, slots: frozenset[int],
                    request: pb.SubscribeRequest) -> None:
        """Run one part until it breaks, then hand its slots back (or fail the whole)."""
        error: MeshError
        try:
            call = self._mesh.stub(pb_grpc.EventsServiceStub, address).Subscribe(
                request, metadata=self._mesh.call_metadata())
            async for message in call:
                await self._receive(message, slots)
            error = UnavailableError(f"subscription stream from {address} ended",
                                     code=grpc.StatusCode.UNAVAILABLE)
        except grpc.aio.AioRpcError as exc:
            if self._closed:
                return
            error = from_rpc_error(exc, address)
        error.address = error.address or address
        self._broken(slots, error)

    async def _receive(self, message: pb.SubscribeResponse, slots: frozenset[int]) -> None:
        kind = message.WhichOneof("content")
        if kind == "event":
            e = message.event
            if self.target.stream is not None:
                if e.version <= self._fetched_version:
                    return  # already delivered (defensive: the server should not repeat)
                self._fetched_version = e.version
            elif e.position <= self._fetched.get(e.slot, 0):
                return
            self._fetched[e.slot] = e.position
            self._anchored.add(e.slot)
            await self._queue.put(RecordedEvent.from_proto(e))
        elif kind == "checkpoint":
            moved = merge_positions(self._fetched, message.checkpoint.positions)
            self._anchored.update(moved)
            if moved:
                await self._queue.put(Checkpoint(moved))
        elif kind == "caught_up":
            caught = message.caught_up
            merge_positions(self._fetched, caught.positions)
            self._fetched_version = max(self._fetched_version, caught.version)
            self._anchored.update(slots)
            await self._queue.put(_PartCaughtUp(slots, dict(caught.positions), caught.version))
        elif kind == "fell_behind":
            await self._queue.put(_PartFellBehind(slots))
        elif kind == "confirmation":
            self._failures = 0
            self._unconfirmed -= slots
            if not self._unconfirmed:
                self._confirmed.set()

    def _broken(self, slots: frozenset[int], error: MeshError) -> None:
        """A part ended: plan its slots again, or end the subscription with ``error``."""
        if self._closed:
            return
        fatal = not retryable(error)
        if (self.target.stream is None and self._mesh.follower is None
                and classify(error) is Verdict.REDIRECT):
            # Nodes cannot forward a multi-slot Subscribe, and without the map
            # there is no knowing how to split it.
            error = FailedPreconditionError(
                f"subscription to {self.target}: a category or all subscription needs the "
                "cluster map (Mesh(etcd=...)); with fixed addresses, one node must lead "
                f"every slot ({error.message})", code=grpc.StatusCode.FAILED_PRECONDITION,
                reason=error.reason, metadata=error.metadata)
            fatal = True
        if fatal:
            log.warning("subscription to %s failed: %s", self.target, error)
            self._error = error
            self._confirmed.set()
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(error)
            current = asyncio.current_task()
            for task in [*self._parts, self._supervisor]:
                if task is not None and task is not current:
                    task.cancel()
            return
        log.info("subscription to %s: part of %d slot(s) broke (%s); subscribing again",
                 self.target, len(slots), error)
        self._last_error = error
        self._failures += 1
        self._homeless |= slots
        self._wake.set()
