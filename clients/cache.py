"""Typed cache calls: ``await mesh.cache.get("k")``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from clients.errors import (
    InvalidArgumentError,
    NoNodesError,
    UnavailableError,
    WatchGapError,
    from_rpc_error,
)
from clients.retry import Backoff
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh

Value = bytes | str
TTL = float | timedelta | None

_BATCH = 1000
_RETRY = Backoff()

T = TypeVar("T")
# send(address, indexes, budget): one batch call to one node for keys[i] for i in indexes.
Send = Callable[[str, list[int], float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A key's value with its version (for only_if_version) and expiry (epoch seconds)."""

    value: bytes
    version: int
    expire_at: float | None


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


@dataclass(frozen=True, slots=True)
class NodeStats:
    node: str
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    expirations: int
    eviction_policy: str
    revision: int
    watchers: int


def _bytes(value: Value) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _duration(ttl: TTL) -> duration_pb2.Duration | None:
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    whole = int(seconds) if seconds >= 0 else -int(-seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def _entry(r: pb.GetResponse) -> CacheEntry | None:
    if not r.found:
        return None
    expire = None
    if r.HasField("expire_time"):
        expire = r.expire_time.seconds + r.expire_time.nanos / 1e9
    return CacheEntry(r.value, r.version, expire)


class CacheClient:
    """The cache, spread over the mesh's nodes. Every call takes ``timeout=`` (seconds)."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def _stub(self, address: str) -> pb_grpc.CacheServiceStub:
        return self._mesh.stub(pb_grpc.CacheServiceStub, address)

    async def _rpc(self, address: str, method: str, request: Any, budget: float) -> Any:
        try:
            return await getattr(self._stub(address), method)(request, timeout=budget)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def _retrying(
        self, attempt: Callable[[float], Awaitable[T]], timeout: float | None, retry: bool
    ) -> T:
        """Run ``attempt(budget)``; if the node was unavailable and ``retry`` is set,
        run it again on the current membership, with backoff, until the deadline.

        Only calls whose repetition cannot change the outcome are marked ``retry``.
        """
        loop = asyncio.get_running_loop()
        budget = self._mesh.timeout if timeout is None else timeout
        deadline = loop.time() + budget
        tries = 0
        while True:
            try:
                return await attempt(budget)
            except UnavailableError:
                pause = _RETRY.delay(tries)
                budget = deadline - loop.time() - pause
                if not retry or budget <= 0:
                    raise
            tries += 1
            await asyncio.sleep(pause)
            await self._mesh.refresh(timeout=budget)

    async def _call(
        self, key: str, method: str, request: Any, timeout: float | None, retry: bool
    ) -> Any:
        """One unary call to the node that owns ``key``."""

        async def attempt(budget: float) -> Any:
            return await self._rpc(self._mesh.route("cache", key).address, method, request, budget)

        return await self._retrying(attempt, timeout, retry)

    # -- single keys -------------------------------------------------------

    async def get(self, key: str, *, timeout: float | None = None) -> bytes | None:
        """The value of ``key``, or None if it is missing or expired."""
        r = await self._call(key, "Get", pb.GetRequest(key=key), timeout, True)
        return r.value if r.found else None

    async def get_entry(self, key: str, *, timeout: float | None = None) -> CacheEntry | None:
        """The value with its version and expiry, or None."""
        r = await self._call(key, "Get", pb.GetRequest(key=key), timeout, True)
        return _entry(r)

    async def set(
        self, key: str, value: Value, *, ttl: TTL = None, only_if_absent: bool = False,
        only_if_version: int = 0, timeout: float | None = None,
    ) -> int:
        """Write ``key``; returns its new version.

        Raises KeyExistsError / VersionMismatchError when a condition fails.
        """
        request = pb.SetRequest(
            key=key, value=_bytes(value), ttl=_duration(ttl),
            only_if_absent=only_if_absent, only_if_version=only_if_version,
        )
        # An unconditional set is idempotent; a conditional one is not (a retry
        # after a lost reply would fail its own condition), so it is not retried.
        retry = not only_if_absent and not only_if_version
        r = await self._call(key, "Set", request, timeout, retry)
        return int(r.version)

    async def delete(
        self, key: str, *, only_if_version: int = 0, timeout: float | None = None
    ) -> bool:
        """Remove ``key``; True if it existed."""
        request = pb.DeleteRequest(key=key, only_if_version=only_if_version)
        r = await self._call(key, "Delete", request, timeout, not only_if_version)
        return bool(r.deleted)

    async def incr(
        self, key: str, delta: int = 1, *, ttl: TTL = None, timeout: float | None = None
    ) -> int:
        """Add ``delta`` to an integer value (created at 0); returns the new value.

        Not retried: a retry after a lost reply would add twice.
        """
        request = pb.IncrRequest(key=key, delta=delta, ttl=_duration(ttl))
        r = await self._call(key, "Incr", request, timeout, False)
        return int(r.value)

    # -- batches -----------------------------------------------------------

    def _by_node(self, indexes: Iterable[int], keys: Sequence[str]) -> list[tuple[str, list[int]]]:
        """``indexes`` into ``keys`` grouped by owner node, at most _BATCH per group."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i in indexes:
            groups[self._mesh.route("cache", keys[i]).address].append(i)
        return [(address, share[start:start + _BATCH])
                for address, share in groups.items()
                for start in range(0, len(share), _BATCH)]

    async def _batched(self, keys: Sequence[str], send: Send, timeout: float | None) -> None:
        """Call ``send(address, indexes, budget)`` for each node's share of ``keys``, in
        parallel. A share whose node is unavailable is grouped again by the current
        owners and re-sent (batch calls are safe to repeat), within the deadline."""

        async def deliver(indexes: list[int]) -> None:
            async def attempt(budget: float) -> None:
                shares = self._by_node(indexes, keys)
                await asyncio.gather(*(send(address, share, budget) for address, share in shares))

            await self._retrying(attempt, timeout, True)

        shares = self._by_node(range(len(keys)), keys)
        await asyncio.gather(*(deliver(share) for _, share in shares))

    async def mget(
        self, keys: Sequence[str], *, timeout: float | None = None
    ) -> list[bytes | None]:
        """Values for ``keys``, in order (None where missing). Nodes are asked in parallel."""
        results: list[bytes | None] = [None] * len(keys)

        async def fetch(address: str, indexes: list[int], budget: float) -> None:
            request = pb.MGetRequest(keys=[keys[i] for i in indexes])
            r = await self._rpc(address, "MGet", request, budget)
            for i, item in zip(indexes, r.results, strict=True):
                results[i] = item.value if item.found else None

        await self._batched(keys, fetch, timeout)
        return results

    async def mset(
        self, items: Mapping[str, Value] | Sequence[tuple[str, Value]], *, ttl: TTL = None,
        timeout: float | None = None,
    ) -> list[int]:
        """Write many keys; returns their versions in order.

        Atomic per node (all of a node's keys or none), not across nodes.
        """
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        keys = [k for k, _ in pairs]
        versions = [0] * len(pairs)
        duration = _duration(ttl)

        async def store(address: str, indexes: list[int], budget: float) -> None:
            entries = [pb.MSetEntry(key=pairs[i][0], value=_bytes(pairs[i][1]), ttl=duration)
                       for i in indexes]
            r = await self._rpc(address, "MSet", pb.MSetRequest(entries=entries), budget)
            for i, version in zip(indexes, r.versions, strict=True):
                versions[i] = version

        await self._batched(keys, store, timeout)
        return versions

    # -- watch and stats ---------------------------------------------------

    def watch(
        self, keys: Sequence[str] = (), prefixes: Sequence[str] = ()
    ) -> CacheWatch:
        """Follow changes: ``async with mesh.cache.watch(prefixes=["user:"]) as w:
        async for event in w: ...``. Entering returns once every node has confirmed
        the watch, so no later change is missed."""
        return CacheWatch(self, list(keys), list(prefixes))

    async def stats(self, *, timeout: float | None = None) -> list[NodeStats]:
        """Per-node cache counters."""
        budget = self._mesh.timeout if timeout is None else timeout

        async def one(node: str, address: str) -> NodeStats:
            r = await self._rpc(address, "Stats", pb.StatsRequest(), budget)
            policy = pb.EvictionPolicy.Name(r.eviction_policy)
            return NodeStats(node, r.entries, r.bytes, r.max_entries, r.max_bytes, r.hits,
                             r.misses, r.evictions, r.expirations,
                             policy.removeprefix("EVICTION_POLICY_").lower(), r.revision,
                             r.watchers)

        nodes = self._mesh.nodes("cache")
        return list(await asyncio.gather(*(one(n.node_id, n.address) for n in nodes)))


class CacheWatch:
    """A merged stream of changes from every node that holds watched keys."""

    def __init__(self, client: CacheClient, keys: list[str], prefixes: list[str]) -> None:
        self._client = client
        self._keys = keys
        self._prefixes = prefixes
        self._queue: asyncio.Queue[CacheEvent | BaseException] = asyncio.Queue()
        self._calls: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> CacheWatch:
        mesh = self._client._mesh
        plan: dict[str, tuple[str, list[str], list[str]]] = {}
        for key in self._keys:
            node = mesh.route("cache", key)
            plan.setdefault(node.address, (node.node_id, [], []))[1].append(key)
        if self._prefixes:  # a prefix can match keys on any node
            for node in mesh.nodes("cache"):
                plan.setdefault(node.address, (node.node_id, [], []))[2].extend(self._prefixes)
        if not self._keys and not self._prefixes:
            raise InvalidArgumentError("keys: give at least one key or prefix",
                                       field_violations={"keys": "give at least one key or prefix"})
        if not plan:
            raise NoNodesError("no live node offers the cache service")
        started: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for address, (node_id, keys, prefixes) in plan.items():
            call = self._client._stub(address).Watch(pb.WatchRequest(keys=keys, prefixes=prefixes))
            self._calls.append(call)
            ready: asyncio.Future[None] = loop.create_future()
            started.append(ready)
            self._tasks.append(asyncio.create_task(self._pump(node_id, call, ready)))
        try:
            await asyncio.gather(*started)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __aiter__(self) -> AsyncIterator[CacheEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[CacheEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _pump(self, node: str, call: Any, ready: asyncio.Future[None]) -> None:
        last = 0
        try:
            async for message in call:
                if message.created:
                    if not ready.done():
                        ready.set_result(None)
                    continue
                if message.seq != last + 1:
                    missed = message.seq - last - 1
                    self._queue.put_nowait(WatchGapError(
                        f"watch on {node} missed {missed} changes", missed=missed))
                    return
                last = message.seq
                e = message.event
                self._queue.put_nowait(
                    CacheEvent(EventType(e.type), e.key, e.value, e.revision, node))
            error: BaseException = UnavailableError(f"watch stream from {node} ended")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            error = from_rpc_error(exc)
        except asyncio.CancelledError:
            raise
        if not ready.done():
            ready.set_exception(error)
        else:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(error)
