"""``mesh.notify.subscribe(...)``: channels (and an inbox), resumed across failures.

The channels are split by owner (the primary of each name's slot) into one
Subscribe stream per node, merged into one iterator. For every channel the
client remembers the last offset received and its epoch; when a stream ends
for any reason but ``close()`` (UNAVAILABLE at a failover, WRONG_OWNER after a
move, a lost connection, SUBSCRIBER_TOO_SLOW, its watchdog, a map that moved
its slots), its channels are planned again on the refreshed map and subscribed
from those positions, so nothing is missed or repeated while the history
reaches back; when it does not, a `ChannelState` with ``recovered=False`` says
what was lost. An error that retrying cannot fix ends the iteration.

With patterns, the 16384 slots are split by owner too (one stream per node,
naming the slots it leads and the patterns); every channel the patterns find
is then followed like a named one, and resumed from its position. A stream
that starts again after every channel of its slots had a position asks for the
unknown ones from their first offset: they were created meanwhile.

One gap remains possible: a channel subscribed "from now" (no ``since``) whose
stream breaks before its first ChannelState arrives resumes from the new now;
likewise, a pattern stream that breaks before all of its first ChannelStates
arrived starts the channels it does not know from the new now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
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
    UnavailableError,
    from_rpc_error,
)
from clients.event_subscription import ALL_SLOTS, retryable
from clients.event_types import to_ranges
from clients.notify_types import ChannelState, InboxItem, NotifyItem, Position, Publication
from clients.presence import PresenceEvent
from clients.requests import build
from clients.retry import Backoff, Verdict, classify
from clients.watchdog import Watchdog, cancelled_under_us
from common.heartbeat import WATCHDOG_INTERVALS
from common.slots import SLOT_COUNT, slot_for
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh

__all__ = ["NotifySubscription"]

log = logging.getLogger(__name__)

SERVICE = "notify"
_BACKOFF = Backoff(initial=0.05, maximum=2.0)

Key = tuple[bool, str]
"""(is the inbox, channel name or user)."""
Unit = Key | int
"""What a stream covers: a named channel or inbox, or (for patterns) a slot."""


class _Closed:
    pass


_CLOSED = _Closed()
_Queued = NotifyItem | BaseException | _Closed


@dataclass(eq=False)
class _Part:
    """One Subscribe stream: the names it covers, on one node."""

    address: str
    keys: frozenset[Unit]
    task: asyncio.Task[None] | None = None
    call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.SubscribeResponse] | None = None
    watchdog: Watchdog | None = None
    moved: bool = False
    """Cancelled by us: the map now gives (some of) its names to another node."""
    initial_states: int = -1
    """ChannelStates still to come at its start (-1: before its confirmation)."""

    @property
    def slots(self) -> set[int]:
        return {u for u in self.keys if isinstance(u, int)}

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class NotifySubscription:
    """An async iterator of `Publication`, `InboxItem`, `PresenceEvent` (with
    ``presence_events``) and `ChannelState` (when a channel could not be
    recovered, or always with ``include_states``), from ``NotifyClient.subscribe``.

    ``positions`` (channel -> `Position`) and ``inbox_position`` are where the
    subscription stands after the last item taken: pass them back as ``since``
    to continue exactly there. Use ``async with`` or call ``close()``.
    """

    def __init__(self, mesh: Mesh, since: Mapping[str, Position | None], *,
                 inbox: str | None, inbox_since: Position | None, buffer: int,
                 include_states: bool, timeout: float | None,
                 heartbeat_interval: float | None, patterns: Sequence[str] = (),
                 patterns_from_start: bool = False, presence_events: bool = False,
                 queue_size: int = 1000) -> None:
        self._mesh = mesh
        self._buffer = buffer
        self._presence_events = presence_events
        self._states = include_states
        self._timeout = timeout
        # Checked here, where the caller passed it (not when a stream opens).
        self._heartbeat_interval = None if heartbeat_interval is None \
            else duration(heartbeat_interval, "heartbeat_interval")
        self.inbox = inbox
        wanted: dict[Key, Position | None] = {(False, c): p for c, p in since.items()}
        if inbox:
            wanted[(True, inbox)] = inbox_since
        self.patterns = tuple(patterns)
        self._keys: frozenset[Unit] = frozenset(wanted) | (
            ALL_SLOTS if self.patterns else frozenset())
        # What the pumps received: where a broken part resumes (None: from now on).
        self._fetched: dict[Key, Position | None] = dict(wanted)
        self._named = frozenset(wanted)
        self._taken: dict[Key, Position] = {k: p for k, p in wanted.items() if p is not None}
        # Slots whose channels are all known (every channel matching there now
        # has a position): a resumed stream starts unknown ones from their start.
        self._anchored: set[int] = set(ALL_SLOTS) if patterns_from_start else set()
        self._homeless: set[Unit] = set(self._keys)
        self._unconfirmed: set[Unit] = set(self._keys)
        self._parts: set[_Part] = set()
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=queue_size)
        self._wake = asyncio.Event()
        self._confirmed = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None
        self._failures = 0
        self._last_error: MeshError | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.resumes = 0
        """Streams subscribed again after they broke (diagnostics)."""

    # -- positions -------------------------------------------------------------------

    @property
    def positions(self) -> dict[str, Position]:
        """Channel -> the position after the last item taken (channels with one)."""
        return {name: p for (inbox, name), p in self._taken.items() if not inbox}

    @property
    def inbox_position(self) -> Position | None:
        """The inbox's position after the last item taken."""
        return self._taken.get((True, self.inbox)) if self.inbox else None

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> NotifySubscription:
        """Subscribe; returns once every name is confirmed by its node. Raises the
        last error if that does not happen within the timeout."""
        if self._closed:
            return self
        if self._supervisor is None:
            self._wake.set()
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name="notify-subscription")
            self._unlisten = self._mesh.on_topology_change(self._topology_changed)
        try:
            await asyncio.wait_for(self._confirmed.wait(), self._budget())
        except TimeoutError:
            await self.close()
            if self._last_error is not None:
                raise self._last_error from None
            raise DeadlineExceededError("notify subscription not confirmed in time",
                                        code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        if self._error is not None:
            error, self._error = self._error, None
            await self.close()
            raise error
        return self

    async def close(self) -> None:
        """Stop every stream; iteration then ends."""
        self._closed = True
        self._confirmed.set()
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

    async def __aenter__(self) -> NotifySubscription:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def parts(self) -> list[tuple[str, frozenset[str], int]]:
        """The running streams, as (node address, names, slots covered) (diagnostics)."""
        return [(p.address, frozenset(u[1] for u in p.keys if not isinstance(u, int)),
                 len(p.slots)) for p in self._parts if p.running]

    # -- consuming -------------------------------------------------------------------

    def __aiter__(self) -> NotifySubscription:
        return self

    async def __anext__(self) -> NotifyItem:
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
            if isinstance(item, Publication):
                self._taken[(False, item.channel)] = Position(item.offset, item.epoch)
                return item
            if isinstance(item, InboxItem):
                self._taken[(True, item.user)] = Position(item.cursor, item.epoch)
                return item
            if isinstance(item, PresenceEvent):
                return item
            key = (bool(item.inbox), item.inbox or item.channel)
            self._taken[key] = Position(item.offset, item.epoch)
            if self._states or not item.recovered:
                return item

    # -- parts -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Subscribe the names without a stream, whenever there are some."""
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
                if self._mesh.closed:
                    self._broken(frozenset(homeless), UnavailableError(
                        "the client was closed", code=grpc.StatusCode.UNAVAILABLE))
                    continue
                try:
                    plan = self._plan(homeless)
                except MeshError as exc:  # no node known at all
                    self._broken(frozenset(homeless), exc)
                    continue
                for address, units in plan:
                    self._launch(_Part(address, frozenset(units)))
        except Exception as exc:
            log.exception("notify subscription: the supervisor failed")
            self._broken(self._keys, InternalError(
                f"notify subscription failed: {exc!r}", code=grpc.StatusCode.INTERNAL),
                fatal=True)

    def _plan(self, units: set[Unit]) -> list[tuple[str, set[Unit]]]:
        """One stream per owner; without the map, one per name (any node forwards
        a stream naming one channel) and one for the slots of the patterns."""
        if self._mesh.table is None:
            shares: list[set[Unit]] = [{u} for u in units if not isinstance(u, int)]
            slots: set[Unit] = {u for u in units if isinstance(u, int)}
            if slots:
                shares.append(slots)
            return [(self._owner(next(iter(share))), share) for share in shares]
        by_owner: dict[str, set[Unit]] = {}
        for unit in units:
            by_owner.setdefault(self._owner(unit), set()).add(unit)
        return list(by_owner.items())

    def _owner(self, unit: Unit) -> str:
        if isinstance(unit, int):
            if self._mesh.table is None:  # fixed addresses: one node must lead them all
                return self._mesh.any_node(SERVICE).address
            return self._mesh.route_slot(SERVICE, unit).address
        return self._mesh.route(SERVICE, unit[1]).address

    def _led_elsewhere(self, unit: Unit, address: str) -> bool:
        target = self._mesh.route_slot(SERVICE, unit) if isinstance(unit, int) \
            else self._mesh.route(SERVICE, unit[1])
        return target.owner and target.address != address

    def _launch(self, part: _Part) -> None:
        part.task = asyncio.get_running_loop().create_task(
            self._pump(part), name=f"notify-subscription-part:{part.address}")
        self._parts.add(part)
        part.task.add_done_callback(lambda _task: self._parts.discard(part))

    def _topology_changed(self) -> None:
        """Move the streams whose names the map now gives to another node."""
        if self._closed or self._mesh.table is None:
            return
        for part in list(self._parts):
            moved = False
            with contextlib.suppress(MeshError):
                moved = part.running and not part.moved and any(
                    self._led_elsewhere(unit, part.address) for unit in part.keys)
            if moved:
                part.moved = True
                if part.call is not None:
                    part.call.cancel()

    def _request(self, part: _Part) -> pb.SubscribeRequest:
        request = build(pb.SubscribeRequest)(buffer=self._buffer)
        if self._heartbeat_interval is not None:
            request.heartbeat_interval.CopyFrom(self._heartbeat_interval)
        keys = {u for u in part.keys if not isinstance(u, int)}
        slots = part.slots
        if slots:
            request.patterns.extend(self.patterns)
            if not (self._mesh.table is None and len(slots) == SLOT_COUNT):  # empty: all
                request.slots.extend(pb.SlotRange(start=a, end=b) for a, b in to_ranges(slots))
            request.patterns_from_start = slots <= self._anchored
            request.patterns_presence_events = self._presence_events
            # The channels found by the patterns so far resume where they were.
            keys |= {k for k, p in self._fetched.items()
                     if p is not None and k not in self._named and not k[0]
                     and slot_for(k[1]) in slots}
        for inbox, name in sorted(keys):
            position = self._fetched.get((inbox, name))
            if inbox:
                request.inbox = name
                if position is not None:
                    request.inbox_since.CopyFrom(position.to_proto())
            else:
                channel = request.channels.add(
                    channel=name, presence_events=self._presence_events
                    and (inbox, name) in self._named)
                if position is not None:
                    channel.since.CopyFrom(position.to_proto())
        return request

    def _budget(self) -> float:
        return self._mesh.timeout if self._timeout is None else self._timeout

    async def _pump(self, part: _Part) -> None:
        """Run one stream until it ends, then hand its names back (or fail the whole)."""
        address = part.address
        release = self._mesh.hold(address)
        watchdog: Watchdog | None = None
        error: MeshError
        try:
            part.call = call = self._mesh.stub(pb_grpc.NotifyServiceStub, address).Subscribe(
                self._request(part), metadata=self._mesh.call_metadata())
            part.watchdog = watchdog = Watchdog(call, self._budget())
            if part.moved:
                call.cancel()
            async for message in call:
                watchdog.busy()
                await self._receive(message, part, watchdog)
                watchdog.waiting()
            error = UnavailableError(f"notify stream from {address} ended",
                                     code=grpc.StatusCode.UNAVAILABLE)
        except grpc.aio.AioRpcError as exc:
            stopped_by_us = part.moved or (watchdog is not None and watchdog.stalled)
            error = self._why_cancelled(part) if stopped_by_us else from_rpc_error(exc, address)
        except asyncio.CancelledError:
            if not cancelled_under_us():
                raise
            error = self._why_cancelled(part)
        except grpc.aio.UsageError as exc:
            error = UnavailableError(f"notify stream to {address} not sent: {exc}",
                                     code=grpc.StatusCode.UNAVAILABLE)
        except Exception as exc:
            log.exception("notify subscription: the stream from %s failed", address)
            error = InternalError(f"notify subscription failed: {exc!r}",
                                  code=grpc.StatusCode.INTERNAL)
            self._broken(part.keys, error, fatal=True)
            return
        finally:
            if watchdog is not None:
                watchdog.stop()
            release()
        error.address = error.address or address
        self._broken(part.keys, error, moved=part.moved)

    def _why_cancelled(self, part: _Part) -> UnavailableError:
        if part.moved:
            why = "the map gave its names to another node"
        elif part.watchdog is not None and part.watchdog.stalled:
            why = part.watchdog.reason()
        else:
            why = "its call was cancelled (the channel was closed)"
        return UnavailableError(f"notify stream from {part.address} ended: {why}",
                                code=grpc.StatusCode.UNAVAILABLE)

    async def _receive(self, message: pb.SubscribeResponse, part: _Part,
                       watchdog: Watchdog) -> None:
        kind = message.WhichOneof("content")
        if kind == "publication":
            p = message.publication
            key = (False, p.channel)
            position = self._fetched.get(key)
            epoch = position.epoch if position is not None else ""
            if position is not None and p.offset <= position.offset:
                return  # already delivered (defensive: the node does not repeat)
            self._fetched[key] = Position(p.offset, epoch)
            await self._queue.put(Publication.from_proto(p, epoch))
        elif kind == "inbox_item":
            i = message.inbox_item
            key = (True, i.user)
            position = self._fetched.get(key)
            epoch = position.epoch if position is not None else ""
            if position is not None and i.cursor <= position.offset:
                return
            self._fetched[key] = Position(i.cursor, epoch)
            await self._queue.put(InboxItem.from_proto(i, epoch))
        elif kind == "state":
            state = ChannelState.from_proto(message.state)
            key = (bool(state.inbox), state.inbox or state.channel)
            self._fetched[key] = Position(state.offset, state.epoch)
            if part.initial_states > 0:
                part.initial_states -= 1
                if not part.initial_states:  # every channel it covers has a position
                    self._anchored |= part.slots
            await self._queue.put(state)
        elif kind == "presence_event":
            await self._queue.put(PresenceEvent.from_proto(message.presence_event))
        elif kind == "confirmation":
            interval = message.confirmation.heartbeat_interval.ToNanoseconds() / 1e9
            watchdog.arm(WATCHDOG_INTERVALS * interval if interval > 0 else 0.0)
            self._failures = 0
            part.initial_states = message.confirmation.initial_states
            if not part.initial_states:
                self._anchored |= part.slots
            self._unconfirmed -= part.keys
            if not self._unconfirmed:
                self._confirmed.set()

    def _broken(self, keys: frozenset[Unit], error: MeshError, *, moved: bool = False,
                fatal: bool = False) -> None:
        """A stream ended: plan its names again, or end the subscription with ``error``."""
        if self._closed:
            return
        if self._mesh.closed:
            error = UnavailableError("notify subscription: the client was closed",
                                     code=grpc.StatusCode.UNAVAILABLE)
            fatal = True
        if self._mesh.follower is None and classify(error) is Verdict.REDIRECT:
            # No node forwards a stream naming several channels (or patterns), and
            # without the map there is no knowing how to split them by owner.
            error = FailedPreconditionError(
                "a subscription to several channels or to patterns needs the cluster map "
                f"(Mesh(etcd=...)) unless one node leads them all ({error.message})",
                code=grpc.StatusCode.FAILED_PRECONDITION, reason=error.reason,
                metadata=error.metadata)
            fatal = True
        if fatal or not retryable(error):
            log.warning("notify subscription failed: %s", error)
            self._error = error
            self._confirmed.set()
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(error)
            current = asyncio.current_task()
            for task in [*(p.task for p in self._parts), self._supervisor]:
                if task is not None and task is not current:
                    task.cancel()
            return
        self._homeless |= keys
        self._wake.set()
        self.resumes += 1
        if moved:
            return
        log.info("notify subscription: a stream of %d name(s) broke (%s); subscribing again",
                 len(keys), error)
        self._last_error = error
        self._failures += 1
