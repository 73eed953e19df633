"""A blocking facade over the asyncio client, for scripts and REPLs.

    with SyncMesh(etcd="127.0.0.1:2379") as mesh:
        mesh.cache.set("k", "v")
        mesh.cache.get("k")
        with mesh.lock("orders", ttl=10) as lease:
            ...  # refreshed in the background meanwhile
        mesh.events.append("order-1", NewEvent("OrderPlaced", {"total": 5}))
        for event in mesh.events.read_stream("order-1"): ...
        mesh.scheduler.enqueue("mail", "email.send", {"to": "a@example.com"})
        mesh.scheduler.worker("mail", {"email.send": send}, concurrency=4).run()

The asyncio client runs on a private event loop in a daemon thread; each call
blocks until its coroutine finishes there. Same arguments, same exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from clients.cache import TTL, CacheEntry, NodeStats, Value
from clients.event_subscription import Subscription
from clients.event_types import (
    ANY,
    BEGINNING,
    AppendResult,
    ExpectedVersion,
    Item,
    NewEvent,
    Positions,
    ReadPage,
    RecordedEvent,
    Start,
    StreamMetadata,
)
from clients.lease import Lease, LostCallback
from clients.lock import LockInfo
from clients.mesh import Mesh
from clients.sync_notify import SyncNotify
from clients.sync_scheduler import SyncScheduler

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mesh-sync", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """Drive an async iterator from this thread, one item per round trip."""
        while True:
            try:
                yield self.run(_next(items))
            except StopAsyncIteration:
                return


async def _next(items: AsyncIterator[T]) -> T:
    return await items.__anext__()


class SyncCache:
    """Blocking versions of ``CacheClient``'s calls."""

    def __init__(self, mesh: Mesh, loop: _Loop) -> None:
        self._cache = mesh.cache
        self._loop = loop

    def get(self, key: str, *, linearizable: bool = False,
            timeout: float | None = None) -> bytes | None:
        return self._loop.run(self._cache.get(key, linearizable=linearizable, timeout=timeout))

    def get_entry(self, key: str, *, linearizable: bool = False,
                  timeout: float | None = None) -> CacheEntry | None:
        return self._loop.run(self._cache.get_entry(key, linearizable=linearizable,
                                                     timeout=timeout))

    def set(
        self, key: str, value: Value, *, ttl: TTL = None, only_if_absent: bool = False,
        only_if_version: int = 0, timeout: float | None = None,
    ) -> int:
        return self._loop.run(self._cache.set(
            key, value, ttl=ttl, only_if_absent=only_if_absent,
            only_if_version=only_if_version, timeout=timeout))

    def delete(self, key: str, *, only_if_version: int = 0, timeout: float | None = None) -> bool:
        return self._loop.run(
            self._cache.delete(key, only_if_version=only_if_version, timeout=timeout))

    def incr(self, key: str, delta: int = 1, *, ttl: TTL = None,
             timeout: float | None = None) -> int:
        return self._loop.run(self._cache.incr(key, delta, ttl=ttl, timeout=timeout))

    def mget(self, keys: Sequence[str], *, linearizable: bool = False,
             timeout: float | None = None) -> list[bytes | None]:
        return self._loop.run(self._cache.mget(keys, linearizable=linearizable,
                                               timeout=timeout))

    def mset(self, items: Mapping[str, Value] | Sequence[tuple[str, Value]], *, ttl: TTL = None,
             timeout: float | None = None) -> list[int]:
        return self._loop.run(self._cache.mset(items, ttl=ttl, timeout=timeout))

    def stats(self, *, timeout: float | None = None) -> list[NodeStats]:
        return self._loop.run(self._cache.stats(timeout=timeout))


class SyncLocks:
    """Blocking versions of ``LockClient``'s calls. A lease's ``held`` and ``check()``
    work from any thread; refresh and release it through these calls."""

    def __init__(self, mesh: Mesh, loop: _Loop) -> None:
        self._locks = mesh.locks
        self._loop = loop

    def acquire(
        self, name: str, *, ttl: float | None = None, wait: float | None = None,
        permits: int = 1, max_permits: int = 1, shared: bool = False, owner: str = "",
        timeout: float | None = None,
    ) -> Lease:
        return self._loop.run(self._locks.acquire(
            name, ttl=ttl, wait=wait, permits=permits, max_permits=max_permits, shared=shared,
            owner=owner, timeout=timeout))

    def try_acquire(
        self, name: str, *, ttl: float | None = None, permits: int = 1, max_permits: int = 1,
        shared: bool = False, owner: str = "", timeout: float | None = None,
    ) -> Lease | None:
        return self._loop.run(self._locks.try_acquire(
            name, ttl=ttl, permits=permits, max_permits=max_permits, shared=shared, owner=owner,
            timeout=timeout))

    def release(self, lease: Lease, *, timeout: float | None = None) -> None:
        self._loop.run(self._locks.release(lease, timeout=timeout))

    def refresh(self, lease: Lease, ttl: float | None = None, *,
                timeout: float | None = None) -> None:
        self._loop.run(self._locks.refresh(lease, ttl, timeout=timeout))

    def describe(self, name: str, *, timeout: float | None = None) -> LockInfo:
        return self._loop.run(self._locks.describe(name, timeout=timeout))

    def validate(self, name: str, token: int, *, timeout: float | None = None) -> bool:
        return self._loop.run(self._locks.validate(name, token, timeout=timeout))


class SyncSubscription:
    """A blocking ``Subscription``: ``for event in sub: ...``; ``with`` closes it."""

    def __init__(self, subscription: Subscription, loop: _Loop) -> None:
        self._sub = subscription
        self._loop = loop

    @property
    def version(self) -> int:
        return self._sub.version

    @property
    def positions(self) -> Positions:
        return dict(self._sub.positions)

    def __iter__(self) -> Iterator[Item]:
        return self._loop.iterate(self._sub)

    def close(self) -> None:
        self._loop.run(self._sub.close())

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncEvents:
    """Blocking versions of ``EventsClient``'s calls; iterators fetch page by page."""

    def __init__(self, mesh: Mesh, loop: _Loop) -> None:
        self._events = mesh.events
        self._loop = loop

    def append(self, stream: str, events: NewEvent | Iterable[NewEvent],
               expected: ExpectedVersion = ANY, *, timeout: float | None = None) -> AppendResult:
        return self._loop.run(self._events.append(stream, events, expected, timeout=timeout))

    def read(self, stream: str, from_version: int | None = None, *, backward: bool = False,
             max_count: int = 100, timeout: float | None = None) -> ReadPage:
        return self._loop.run(self._events.read(
            stream, from_version, backward=backward, max_count=max_count, timeout=timeout))

    def read_stream(self, stream: str, from_version: int | None = None, *,
                    backward: bool = False, page_size: int = 100,
                    timeout: float | None = None) -> Iterator[RecordedEvent]:
        return self._loop.iterate(self._events.read_stream(
            stream, from_version, backward=backward, page_size=page_size, timeout=timeout))

    def read_all(self, *, slots: Iterable[int] | None = None, page_size: int = 100,
                 concurrency: int = 32, timeout: float | None = None) -> Iterator[RecordedEvent]:
        return self._loop.iterate(self._events.read_all(
            slots=slots, page_size=page_size, concurrency=concurrency, timeout=timeout))

    def subscribe(
        self, stream: str | None = None, *, category: str | None = None, all: bool = False,
        after_version: int = 0, after_positions: Mapping[int, int] | None = None,
        start: Start = BEGINNING, include_markers: bool = False,
        checkpoint_interval: int = 0, timeout: float | None = None,
    ) -> SyncSubscription:
        """A started subscription (confirmed by every node when this returns)."""

        async def started() -> Subscription:
            return await self._events.subscribe(
                stream, category=category, all=all, after_version=after_version,
                after_positions=after_positions, start=start, include_markers=include_markers,
                checkpoint_interval=checkpoint_interval, timeout=timeout).start()

        return SyncSubscription(self._loop.run(started()), self._loop)

    def get_stream_metadata(self, stream: str, *,
                            timeout: float | None = None) -> StreamMetadata:
        return self._loop.run(self._events.get_stream_metadata(stream, timeout=timeout))

    def set_stream_metadata(
        self, stream: str, *, max_count: int = 0, max_age: float | None = None,
        truncate_before: int = 0, expected_metadata_version: int | None = None,
        timeout: float | None = None,
    ) -> int:
        return self._loop.run(self._events.set_stream_metadata(
            stream, max_count=max_count, max_age=max_age, truncate_before=truncate_before,
            expected_metadata_version=expected_metadata_version, timeout=timeout))

    def delete_stream(self, stream: str, expected: ExpectedVersion = ANY, *,
                      timeout: float | None = None) -> int:
        return self._loop.run(self._events.delete_stream(stream, expected, timeout=timeout))

    def tombstone_stream(self, stream: str, expected: ExpectedVersion = ANY, *,
                         timeout: float | None = None) -> int:
        return self._loop.run(self._events.tombstone_stream(stream, expected, timeout=timeout))


class SyncMesh:
    """``Mesh`` without asyncio. Takes the same arguments."""

    def __init__(self, **kwargs: Any) -> None:
        self._loop = _Loop()
        try:
            self._mesh = self._loop.run(self._make(kwargs))
        except BaseException:
            self._loop.stop()
            raise
        self.cache = SyncCache(self._mesh, self._loop)
        self.locks = SyncLocks(self._mesh, self._loop)
        self.events = SyncEvents(self._mesh, self._loop)
        self.scheduler = SyncScheduler(self._mesh, self._loop)
        self.notify = SyncNotify(self._mesh, self._loop)

    @staticmethod
    async def _make(kwargs: dict[str, Any]) -> Mesh:
        mesh = Mesh(**kwargs)  # channels must be created on the loop that uses them
        await mesh.start()
        return mesh

    @contextlib.contextmanager
    def lock(
        self, name: str, *, ttl: float = 30.0, wait: float | None = None, permits: int = 1,
        max_permits: int = 1, shared: bool = False, owner: str = "",
        on_lost: LostCallback | None = None, timeout: float | None = None,
    ) -> Iterator[Lease]:
        """``with mesh.lock("orders", ttl=10) as lease: ...``, as ``Mesh.lock``; the
        lease is refreshed on the client's loop thread (where ``on_lost`` runs too)."""
        held = self._mesh.lock(name, ttl=ttl, wait=wait, permits=permits,
                               max_permits=max_permits, shared=shared, owner=owner, on_lost=on_lost,
                               timeout=timeout)
        lease = self._loop.run(held.__aenter__())
        try:
            yield lease
        except BaseException as exc:
            if not self._loop.run(held.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            self._loop.run(held.__aexit__(None, None, None))

    def close(self) -> None:
        self._loop.run(self._mesh.close())
        self._loop.stop()

    def __enter__(self) -> SyncMesh:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
