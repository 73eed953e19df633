"""``mesh.cache.watch(...)``: a merged stream of cache changes from the nodes that apply them.

Keys are watched on their slot's primary (with the map, the node refuses a key
it does not own, and the watch is set up again by the newer map); prefixes can
match keys of any group, so they are watched on every live node.

A watch never stops silently. When one node's stream ends for any reason but
``close()`` (the node stopped leading the keys, went away, its channel was
closed, it went silent for 3 heartbeat intervals, or the map moved the keys
elsewhere), the watch is opened again on the current map and the iterator
raises ``WatchGapError`` (``missed`` None: unknown) once it is: changes in
between may have been missed, so re-read what matters and iterate again. Every
later change is reported. A watch that cannot be opened again within
``REOPEN_BUDGET`` seconds (or its ``timeout``, if longer) ends with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from clients.durations import duration
from clients.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    MeshError,
    NoNodesError,
    UnavailableError,
    WatchGapError,
    from_rpc_error,
)
from clients.event_subscription import retryable
from clients.retry import Backoff, with_retries
from clients.watchdog import Watchdog, cancelled_under_us
from common.heartbeat import WATCHDOG_INTERVALS
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh

log = logging.getLogger(__name__)

# address -> (node id, keys, prefixes) of one Watch stream.
Plan = dict[str, tuple[str, list[str], list[str]]]

REOPEN_BUDGET = 30.0
"""Seconds a broken watch keeps trying to open again before it fails."""
_BACKOFF = Backoff(initial=0.05, maximum=1.0)


class EventType(Enum):
    SET = pb.EVENT_TYPE_SET
    DELETE = pb.EVENT_TYPE_DELETE
    EXPIRE = pb.EVENT_TYPE_EXPIRE
    EVICT = pb.EVENT_TYPE_EVICT


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """One change seen by ``watch``."""

    type: EventType
    key: str
    value: bytes
    revision: int
    node: str


class _Closed:
    pass


_CLOSED = _Closed()


@dataclass(eq=False)
class _Stream:
    """One Watch stream, on one node."""

    node: str
    address: str
    keys: list[str]
    prefixes: list[str]
    call: Any
    ready: asyncio.Future[None]
    """Done once the node confirmed the watch (``created``), or failed before."""
    task: asyncio.Task[None] | None = None
    watchdog: Watchdog | None = None
    last: int = 0
    """The seq of the last change heard."""
    dropped: bool = False
    """Closed by us on purpose (close(), or no longer planned): nothing to repair."""
    moved: bool = False
    """Cancelled by us: the map moved its keys, or its node left."""
    dead: bool = False
    hold: Callable[[], None] = field(default=lambda: None)


class CacheWatch:
    """A merged stream of changes from every node that holds watched keys.

    Iterate it for each ``CacheEvent``. ``WatchGapError`` means changes may have
    been missed (a slow reader, or a stream broken and opened again); the watch
    goes on, so catch it and iterate again. Any other error ends it.
    """

    def __init__(
        self, mesh: Mesh, keys: list[str], prefixes: list[str], timeout: float | None = None,
        heartbeat_interval: float | None = None,
    ) -> None:
        self._mesh = mesh
        self._keys = keys
        self._prefixes = prefixes
        self._timeout = timeout
        # Checked here, where the caller passed it (not when a stream opens).
        self._heartbeat_interval = None if heartbeat_interval is None \
            else duration(heartbeat_interval, "heartbeat_interval")
        self._queue: asyncio.Queue[CacheEvent | BaseException | _Closed] = asyncio.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = asyncio.Lock()
        self._repairing: asyncio.Task[None] | None = None
        self._dirty = False
        """Something broke or moved since the current repair began."""
        self._replan = asyncio.Event()
        self._broke: list[str] = []
        """Why streams ended since the last gap was reported."""
        self._failed: BaseException | None = None
        self._ended: BaseException | None = None
        """The error that ended the watch, once the reader took it."""
        self._closed = False
        self._unlisten: Callable[[], None] | None = None
        self.stalls = 0
        """Streams ended by their watchdog: their node went silent (diagnostics)."""
        self.reopened = 0
        """Times the watch was opened again after a break (diagnostics)."""

    async def __aenter__(self) -> CacheWatch:
        if not self._keys and not self._prefixes:
            raise InvalidArgumentError("keys: give at least one key or prefix",
                                       field_violations={"keys": "give at least one key or prefix"})
        # Setting up has no effect on the data, so any failure (a refusal, a
        # node down, no map yet) is retried as a whole until the deadline.
        try:
            await with_retries(self._mesh, self._open, timeout=self._timeout, safe=True,
                               follow_hints=False)
        except BaseException:
            await self.close()
            raise
        self._unlisten = self._mesh.on_topology_change(self._topology_changed)
        if self._dirty:  # a stream broke after the last try confirmed it
            self._start_repair()
        else:  # what failed tries left behind was opened again before we began
            self._broke.clear()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every stream; iteration then ends."""
        self._closed = True
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        tasks = [s.task for s in self._streams.values() if s.task is not None]
        for stream in list(self._streams.values()):
            self._drop(stream)
        if self._repairing is not None and self._repairing is not asyncio.current_task():
            tasks.append(self._repairing)
            self._repairing.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._queue.put_nowait(_CLOSED)

    @property
    def nodes(self) -> list[str]:
        """The nodes this watch has a live stream on (diagnostics)."""
        return sorted(s.node for s in self._streams.values() if not s.dead)

    def _plan(self) -> Plan:
        mesh = self._mesh
        plan: Plan = {}
        unowned: list[str] = []
        for key in self._keys:
            target = mesh.route("cache", key)
            if target.owner:
                plan.setdefault(target.address, (target.node_id, [], []))[1].append(key)
            else:
                unowned.append(key)
        if unowned:  # no owner known: one node takes them all (it forwards, or says why not)
            target = mesh.any_node("cache")
            plan.setdefault(target.address, (target.node_id, [], []))[1].extend(unowned)
        if self._prefixes:  # a prefix can match keys of any group
            nodes = mesh.nodes("cache")
            if not nodes:
                raise NoNodesError("no live node offers the cache service")
            for node in nodes:
                plan.setdefault(node.address, (node.node_id, [], []))[2].extend(self._prefixes)
        return plan

    async def _open(self, budget: float, _address: str | None) -> None:
        async with self._lock:
            self._dirty = False
            await self._sync(budget)

    async def _sync(self, budget: float) -> None:
        """Make the streams match the plan: drop those broken or planned differently,
        open the missing ones, and return once each new one is confirmed."""
        plan = self._plan()
        for address, stream in list(self._streams.items()):
            wanted = plan.get(address)
            if stream.dead or wanted is None or (wanted[1], wanted[2]) != (
                    stream.keys, stream.prefixes):
                if not stream.dead:
                    self._broke.append(f"{stream.node}: its keys moved")
                self._drop(stream)
        fresh = [self._start(address, *wanted) for address, wanted in plan.items()
                 if address not in self._streams]
        if not fresh:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*(s.ready for s in fresh)), max(budget, 0.0))
        except TimeoutError:
            raise DeadlineExceededError("the watch was not confirmed before the deadline",
                                        code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        finally:
            for stream in fresh:  # keep the confirmed ones; a retry opens the others
                if not (stream.ready.done() and not stream.ready.cancelled()
                        and stream.ready.exception() is None):
                    self._drop(stream)

    def _start(self, address: str, node_id: str, keys: list[str], prefixes: list[str]
               ) -> _Stream:
        request = pb.WatchRequest(keys=keys, prefixes=prefixes)
        if self._heartbeat_interval is not None:
            request.heartbeat_interval.CopyFrom(self._heartbeat_interval)
        else:  # present and zero: the node's own interval
            request.heartbeat_interval.SetInParent()
        stub = self._mesh.stub(pb_grpc.CacheServiceStub, address)
        call = stub.Watch(request, metadata=self._mesh.call_metadata())
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream = _Stream(node_id, address, keys, prefixes, call, ready,
                         hold=self._mesh.hold(address))
        # Until it is confirmed, the node must answer within the call timeout.
        stream.watchdog = Watchdog(call, self._budget())
        stream.task = asyncio.create_task(self._pump(stream), name=f"watch:{address}")
        self._streams[address] = stream
        return stream

    def _drop(self, stream: _Stream) -> None:
        """Close ``stream`` on purpose: its end is not a break."""
        stream.dropped = stream.dead = True
        if self._streams.get(stream.address) is stream:
            del self._streams[stream.address]
        stream.call.cancel()
        if stream.watchdog is not None:
            stream.watchdog.stop()
        stream.hold()
        if not stream.ready.done():
            stream.ready.set_exception(UnavailableError(
                f"the watch on {stream.node} was closed", code=grpc.StatusCode.UNAVAILABLE))
            stream.ready.exception()  # retrieved: nobody may be waiting for it

    def _budget(self) -> float:
        return self._mesh.timeout if self._timeout is None else self._timeout

    def __aiter__(self) -> CacheWatch:
        return self

    async def __anext__(self) -> CacheEvent:
        if self._ended is not None:
            raise self._ended
        item = await self._queue.get()
        if isinstance(item, _Closed):
            self._queue.put_nowait(item)  # for any later call too
            raise StopAsyncIteration
        if isinstance(item, WatchGapError):
            raise item  # the watch goes on
        if isinstance(item, BaseException):
            self._ended = item
            raise item
        return item

    async def _pump(self, stream: _Stream) -> None:
        """Read one stream until it ends; then have the watch repaired (or fail it)."""
        watchdog = stream.watchdog
        assert watchdog is not None
        error: MeshError
        try:
            async for message in stream.call:
                watchdog.busy()
                self._receive(stream, message, watchdog)
                watchdog.waiting()
            error = UnavailableError(f"watch stream from {stream.node} ended",
                                     code=grpc.StatusCode.UNAVAILABLE)
        except grpc.aio.AioRpcError as exc:
            error = self._stopped(stream) or from_rpc_error(exc, stream.address)
        except asyncio.CancelledError:
            if not cancelled_under_us():
                raise  # close()
            # The call was cancelled under a running task: by us (drop, move,
            # watchdog) or because its channel was closed.
            error = self._stopped(stream) or UnavailableError(
                f"watch stream from {stream.node} ended: its call was cancelled "
                "(the channel was closed)", code=grpc.StatusCode.UNAVAILABLE)
        except Exception as exc:
            log.exception("the watch on %s failed", stream.node)
            error = InternalError(f"the watch on {stream.node} failed: {exc!r}",
                                  code=grpc.StatusCode.INTERNAL)
            error.address = stream.address
            self._broken(stream, error, fatal=True)
            return
        finally:
            watchdog.stop()
            stream.hold()
        error.address = error.address or stream.address
        self._broken(stream, error)

    def _receive(self, stream: _Stream, message: pb.WatchResponse, watchdog: Watchdog) -> None:
        if message.created:
            # Heartbeats promised: silence of a few intervals now means a dead stream.
            # None promised (an older node): the watchdog stays off.
            interval = message.heartbeat_interval.ToNanoseconds() / 1e9
            watchdog.arm(WATCHDOG_INTERVALS * interval if interval > 0 else 0.0)
            if not stream.ready.done():
                stream.ready.set_result(None)
            return
        if message.seq > stream.last + 1 or (message.HasField("heartbeat")
                                             and message.seq > stream.last):
            # Numbers skipped: the node dropped changes we read too slowly (a
            # heartbeat carries the newest number, so a drop shows while idle too).
            missed = message.seq - stream.last - (0 if message.HasField("heartbeat") else 1)
            self._queue.put_nowait(WatchGapError(
                f"watch on {stream.node} missed {missed} changes", missed=missed))
        stream.last = max(stream.last, message.seq)
        if message.HasField("heartbeat"):
            return
        e = message.event
        self._queue.put_nowait(
            CacheEvent(EventType(e.type), e.key, e.value, e.revision, stream.node))

    def _stopped(self, stream: _Stream) -> UnavailableError | None:
        """Why we ended ``stream`` ourselves, if we did."""
        if stream.moved:
            why = "the map moved its keys, or the node left"
        elif stream.watchdog is not None and stream.watchdog.stalled:
            self.stalls += 1
            why = stream.watchdog.reason()
        else:
            return None
        return UnavailableError(f"watch stream from {stream.node} ended: {why}",
                                code=grpc.StatusCode.UNAVAILABLE)

    def _broken(self, stream: _Stream, error: MeshError, *, fatal: bool = False) -> None:
        """A stream ended: open the watch again (reporting a possible gap), or fail."""
        if self._closed or stream.dropped:
            return
        stream.dead = True
        if not stream.ready.done():  # still being opened: the opener retries
            stream.ready.set_exception(error)
            stream.ready.exception()  # retrieved, in case the opener already gave up
            return
        if self._mesh.closed:
            error, fatal = UnavailableError("the watch ended: the client was closed",
                                            code=grpc.StatusCode.UNAVAILABLE), True
        if fatal or not retryable(error):
            self._fail(error)
            return
        log.info("watch: the stream from %s ended (%s); watching again", stream.node, error)
        self._broke.append(f"{stream.node}: {error.message}")
        self._start_repair()

    def _fail(self, error: BaseException) -> None:
        """End the watch with ``error`` (the iterator raises it)."""
        if self._failed is not None or self._closed:
            return
        log.warning("watch failed: %s", error)
        self._failed = error
        self._queue.put_nowait(error)
        for stream in list(self._streams.values()):
            self._drop(stream)
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._repairing is not None and self._repairing is not asyncio.current_task():
            self._repairing.cancel()

    def _start_repair(self) -> None:
        self._dirty = True
        self._replan.set()
        if self._unlisten is None:  # still in __aenter__, which repairs once done
            return
        if self._repairing is None or self._repairing.done():
            self._repairing = asyncio.get_running_loop().create_task(
                self._repair(), name="watch-repair")

    async def _repair(self) -> None:
        """Open again what broke or moved, on the current map, until done; then report
        the possible gap. Fails the watch if that takes longer than its budget."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(REOPEN_BUDGET, self._timeout or 0.0)
        failures = 0
        while not self._closed and self._failed is None:
            if self._mesh.closed:
                self._fail(UnavailableError("the watch ended: the client was closed",
                                            code=grpc.StatusCode.UNAVAILABLE))
                return
            self._dirty = False
            self._replan.clear()
            try:
                async with self._lock:
                    await self._sync(min(self._budget(), deadline - loop.time()))
            except MeshError as exc:
                if not retryable(exc) or loop.time() >= deadline:
                    self._fail(exc)
                    return
                failures += 1
                # Back off, unless the map changes first (the way out of a failover).
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancel that lands as the event is set, and this loop would go on.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_BACKOFF.delay(failures)):
                        await self._replan.wait()
                await self._mesh.refresh(timeout=max(deadline - loop.time(), 0.0))
                continue
            if self._dirty:  # something else broke or moved meanwhile: once more
                continue
            if self._broke:
                why, self._broke = "; ".join(self._broke), []
                self.reopened += 1
                self._queue.put_nowait(WatchGapError(
                    f"the watch was opened again ({why}): changes in between may have "
                    "been missed", missed=None))
            return

    def _topology_changed(self) -> None:
        """Move the streams whose keys the map now gives to another node, or whose node
        left; watch prefixes on nodes that joined. A deposed node that does not know it
        yet would keep its streams open, and silent."""
        if self._closed or self._failed is not None:
            return
        self._replan.set()  # a repair backing off tries again at once
        mesh = self._mesh
        live = {n.address for n in mesh.nodes("cache")}
        stale = []
        for stream in self._streams.values():
            if stream.dead:
                continue
            gone = bool(stream.prefixes) and bool(live) and stream.address not in live
            with contextlib.suppress(MeshError):  # no node known: nothing to move to
                gone = gone or any((t := mesh.route("cache", key)).owner
                                   and t.address != stream.address for key in stream.keys)
            if gone:
                stale.append(stream)
        joined = bool(self._prefixes) and bool(
            live - {s.address for s in self._streams.values() if s.prefixes})
        for stream in stale:
            stream.moved = True
            stream.call.cancel()  # its pump reports the break, which repairs
        if joined and not stale:
            self._broke.append("a node joined")
            self._start_repair()
