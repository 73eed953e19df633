"""A blocking facade over the asyncio client, for scripts and REPLs.

    with SyncMesh(etcd="127.0.0.1:2379") as mesh:
        mesh.cache.set("k", "v")
        mesh.cache.get("k")

The asyncio client runs on a private event loop in a daemon thread; each call
blocks until its coroutine finishes there. Same arguments, same exceptions.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from clients.cache import TTL, CacheEntry, NodeStats, Value
from clients.mesh import Mesh

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


class SyncCache:
    """Blocking versions of ``CacheClient``'s calls."""

    def __init__(self, mesh: Mesh, loop: _Loop) -> None:
        self._cache = mesh.cache
        self._loop = loop

    def get(self, key: str, *, timeout: float | None = None) -> bytes | None:
        return self._loop.run(self._cache.get(key, timeout=timeout))

    def get_entry(self, key: str, *, timeout: float | None = None) -> CacheEntry | None:
        return self._loop.run(self._cache.get_entry(key, timeout=timeout))

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

    def mget(self, keys: Sequence[str], *, timeout: float | None = None) -> list[bytes | None]:
        return self._loop.run(self._cache.mget(keys, timeout=timeout))

    def mset(self, items: Mapping[str, Value] | Sequence[tuple[str, Value]], *, ttl: TTL = None,
             timeout: float | None = None) -> list[int]:
        return self._loop.run(self._cache.mset(items, ttl=ttl, timeout=timeout))

    def stats(self, *, timeout: float | None = None) -> list[NodeStats]:
        return self._loop.run(self._cache.stats(timeout=timeout))


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

    @staticmethod
    async def _make(kwargs: dict[str, Any]) -> Mesh:
        mesh = Mesh(**kwargs)  # channels must be created on the loop that uses them
        await mesh.start()
        return mesh

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
