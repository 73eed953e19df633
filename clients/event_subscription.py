"""``mesh.events.subscribe(...)``: catch-up then live events, kept going across failovers.

A stream subscription is one Subscribe to the stream's owner. A category or
all subscription covers the 16384 slots: they are split by owner (one
Subscribe per primary, naming its slot ranges) and the streams merged into one
iterator. Per part, the client remembers how far it has received (a stream's
version, or slot -> position from events and Checkpoint messages); when a part
ends for any reason but ``close()`` (UNAVAILABLE, WRONG_OWNER, connection loss,
a stream that ends, its call cancelled because its channel was closed, its
watchdog, a map that moved its slots), its slots are planned again on the
refreshed map and resubscribed from those points, so nothing is missed or
repeated. An error that retrying cannot fix ends the iteration with that error.

Liveness: a node that is paused or cut off keeps the TCP connection open and
sends nothing. Nodes send a Heartbeat on an idle stream and give its interval
in the confirmation; each part then has a watchdog (``clients.watchdog``) that
cancels it after 3 intervals of silence, and before its confirmation it must
confirm within the subscription's timeout. When the map names another primary
for a part's slots, the part moves at once, without waiting for the old node
(which may not know it was deposed) to end it.

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

from clients.durations import duration
from clients.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
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
from clients.requests import build
from clients.retry import Backoff, Verdict, classify
from clients.watchdog import Watchdog, cancelled_under_us
from common.heartbeat import WATCHDOG_INTERVALS
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


@dataclass(eq=False)
class _Part:
    """One Subscribe stream: the slots it covers, on one node."""

    address: str
    slots: frozenset[int]
    request: pb.SubscribeRequest
    task: asyncio.Task[None] | None = None
    call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.SubscribeResponse] | None = None
    watchdog: Watchdog | None = None
    moved: bool = False
    """Cancelled by us: the map now gives (some of) its slots to another node."""

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


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
        heartbeat_interval: float | None = None,
    ) -> None:
        self._mesh = mesh
        self.target = target
        self.version = after_version
        self.positions: Positions = {s: p for s, p in after_positions.items() if p > 0}
        self._start = start
        self._markers = include_markers
        self._checkpoint_interval = checkpoint_interval
        self._timeout = timeout
        # Checked here, where the caller passed it (not when a stream opens).
        self._heartbeat_interval = None if heartbeat_interval is None \
            else duration(heartbeat_interval, "heartbeat_interval")
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
        self._parts: set[_Part] = set()
        self._unlisten: Callable[[], None] | None = None
        self.stalls = 0
        """Parts ended by their watchdog: their node went silent (diagnostics)."""
        self.moves = 0
        """Parts moved because the map gave their slots to another node (diagnostics)."""
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
            self._unlisten = self._mesh.on_topology_change(self._topology_changed)
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
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        tasks = [*(p.task for p in self._parts if p.task is not None),
                 *([self._supervisor] if self._supervisor else [])]
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

    @property
    def parts(self) -> list[tuple[str, frozenset[int]]]:
        """The running Subscribe streams, as (node address, slots) (diagnostics).
        Every slot is in one of them, or waiting to be subscribed again."""
        return [(p.address, p.slots) for p in self._parts if p.running]

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
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._failures:
                    await asyncio.sleep(_BACKOFF.delay(self._failures - 1))
                    await self._mesh.refresh()
                homeless, self._homeless = self._homeless, set()
                if not homeless:
                    continue
                if self._mesh.closed:  # _broken turns this into the final error
                    self._broken(frozenset(homeless), UnavailableError(
                        "the client was closed", code=grpc.StatusCode.UNAVAILABLE))
                    continue
                try:
                    plan = self._plan(homeless)
                except MeshError as exc:  # no node known at all
                    self._broken(frozenset(homeless), exc)
                    continue
                for address, slots, request in plan:
                    self._launch(_Part(address, slots, request))
        except Exception as exc:
            # A bug here would leave slots without a part for good: fail loudly.
            log.exception("subscription to %s: the supervisor failed", self.target)
            self._broken(self._slots, InternalError(
                f"subscription to {self.target} failed: {exc!r}",
                code=grpc.StatusCode.INTERNAL), fatal=True)

    def _launch(self, part: _Part) -> None:
        part.task = asyncio.get_running_loop().create_task(
            self._pump(part), name=f"subscription-part:{part.address}")
        self._parts.add(part)
        part.task.add_done_callback(lambda _task: self._parts.discard(part))

    def _topology_changed(self) -> None:
        """Move the parts whose slots the map now gives to another node: a deposed
        node that does not know it yet would keep their streams open, and silent."""
        if self._closed or self._mesh.table is None:
            return
        for part in list(self._parts):
            moved = False
            with contextlib.suppress(MeshError):  # no node known: nothing to move to
                moved = part.running and not part.moved and self._moved_away(part)
            if moved:
                part.moved = True
                self.moves += 1
                if part.call is not None:  # else the pump sees `moved` as it starts
                    part.call.cancel()

    def _moved_away(self, part: _Part) -> bool:
        """Whether the map names a primary other than the part's node for one of its slots."""
        if self.target.stream is not None:
            target = self._mesh.route(SERVICE, self.target.stream)
            return target.owner and target.address != part.address
        for slot in part.slots:
            target = self._mesh.route_slot(SERVICE, slot)
            if target.owner and target.address != part.address:
                return True
        return False

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
            return self._ask_heartbeats(build(pb.SubscribeRequest)(
                stream=self.target.stream, start=start, after_version=self._fetched_version))
        request = build(pb.SubscribeRequest)(
            start=start, checkpoint_interval=self._checkpoint_interval)
        self._ask_heartbeats(request)
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

    def _ask_heartbeats(self, request: pb.SubscribeRequest) -> pb.SubscribeRequest:
        if self._heartbeat_interval is not None:  # else the node's own setting
            request.heartbeat_interval.CopyFrom(self._heartbeat_interval)
        return request

    async def _pump(self, part: _Part) -> None:
        """Run one part until it ends, then hand its slots back (or fail the whole).

        Only ``close()`` (or a fatal error, which cancels every part) ends a part
        quietly: whatever else ends it, its slots are subscribed again.
        """
        address = part.address
        release = self._mesh.hold(address)
        watchdog: Watchdog | None = None
        error: MeshError
        try:
            part.call = call = self._mesh.stub(pb_grpc.EventsServiceStub, address).Subscribe(
                part.request, metadata=self._mesh.call_metadata())
            # Until its confirmation, the node must answer within the call timeout.
            part.watchdog = watchdog = Watchdog(call, self._budget())
            if part.moved:
                call.cancel()
            async for message in call:
                watchdog.busy()
                await self._receive(message, part.slots, watchdog)
                watchdog.waiting()
            error = UnavailableError(f"subscription stream from {address} ended",
                                     code=grpc.StatusCode.UNAVAILABLE)
        except grpc.aio.AioRpcError as exc:
            stopped_by_us = part.moved or (watchdog is not None and watchdog.stalled)
            error = self._why_cancelled(part) if stopped_by_us else from_rpc_error(exc, address)
        except asyncio.CancelledError:
            if not cancelled_under_us():
                raise  # close(), or a fatal error elsewhere: nothing to hand back
            # The call was cancelled under a running task: by our watchdog or a
            # move, or because its channel was closed (the node left the map).
            error = self._why_cancelled(part)
        except grpc.aio.UsageError as exc:  # its channel was closed before the call
            error = UnavailableError(f"subscription to {address} not sent: {exc}",
                                     code=grpc.StatusCode.UNAVAILABLE)
        except Exception as exc:
            log.exception("subscription to %s: the part on %s failed", self.target, address)
            error = InternalError(f"subscription to {self.target} failed: {exc!r}",
                                  code=grpc.StatusCode.INTERNAL)
            error.address = address
            self._broken(part.slots, error, fatal=True)
            return
        finally:
            if watchdog is not None:
                watchdog.stop()
            release()
        error.address = error.address or address
        self._broken(part.slots, error, moved=part.moved)

    def _budget(self) -> float:
        return self._mesh.timeout if self._timeout is None else self._timeout

    def _why_cancelled(self, part: _Part) -> UnavailableError:
        if part.moved:
            why = "the map gave its slots to another node"
        elif part.watchdog is not None and part.watchdog.stalled:
            self.stalls += 1
            why = part.watchdog.reason()
        else:
            why = "its call was cancelled (the channel was closed)"
        return UnavailableError(f"subscription stream from {part.address} ended: {why}",
                                code=grpc.StatusCode.UNAVAILABLE)

    async def _receive(self, message: pb.SubscribeResponse, slots: frozenset[int],
                       watchdog: Watchdog) -> None:
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
            # Heartbeats promised: silence of a few intervals now means a dead stream.
            # None promised (an older node): the watchdog stays off.
            interval = message.confirmation.heartbeat_interval.ToNanoseconds() / 1e9
            watchdog.arm(WATCHDOG_INTERVALS * interval if interval > 0 else 0.0)
            self._failures = 0
            self._unconfirmed -= slots
            if not self._unconfirmed:
                self._confirmed.set()
        # A heartbeat carries nothing: hearing it was the point.

    def _broken(self, slots: frozenset[int], error: MeshError, *, moved: bool = False,
                fatal: bool = False) -> None:
        """A part ended: plan its slots again, or end the subscription with ``error``."""
        if self._closed:
            return
        if self._mesh.closed:
            error = UnavailableError(f"subscription to {self.target}: the client was closed",
                                     code=grpc.StatusCode.UNAVAILABLE)
            fatal = True
        fatal = fatal or not retryable(error)
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
            for task in [*(p.task for p in self._parts), self._supervisor]:
                if task is not None and task is not current:
                    task.cancel()
            return
        self._homeless |= slots
        self._wake.set()
        if moved:  # not a failure: resubscribe at once, on the new owner
            log.info("subscription to %s: %d slot(s) moved; subscribing on the new owner",
                     self.target, len(slots))
            return
        log.info("subscription to %s: part of %d slot(s) broke (%s); subscribing again",
                 self.target, len(slots), error)
        self._last_error = error
        self._failures += 1
