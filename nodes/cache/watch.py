"""Fan-out of cache changes to Watch streams.

Each watcher has a bounded buffer. Appends never wait for a slow watcher: when
its buffer is full the change is dropped for that watcher only, but it still
consumes a sequence number, so the subscriber sees exactly how many it missed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable

from nodes.cache.store import Change

DEFAULT_BUFFER = 4096


class Watcher:
    """One Watch stream's subscription."""

    __slots__ = ("_buffer", "_limit", "_wakeup", "closed", "keys", "prefixes", "seq")

    def __init__(self, keys: frozenset[str], prefixes: tuple[str, ...], limit: int) -> None:
        self.keys = keys
        self.prefixes = prefixes
        self.seq = 0
        self.closed = False
        self._limit = limit
        self._buffer: deque[tuple[int, Change]] = deque()
        self._wakeup = asyncio.Event()

    def push(self, change: Change) -> None:
        self.seq += 1
        if len(self._buffer) < self._limit:
            self._buffer.append((self.seq, change))
            self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    async def next_batch(self) -> list[tuple[int, Change]]:
        """Wait for changes; an empty list means the watcher was closed."""
        while not self._buffer and not self.closed:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = list(self._buffer)
        self._buffer.clear()
        return batch


class WatchHub:
    """Routes every store change to the watchers interested in its key."""

    def __init__(self, buffer_limit: int = DEFAULT_BUFFER, max_watchers: int = 10_000) -> None:
        self.buffer_limit = buffer_limit
        self.max_watchers = max_watchers
        self._by_key: dict[str, set[Watcher]] = {}
        self._prefix_watchers: set[Watcher] = set()
        self._all: set[Watcher] = set()

    def __len__(self) -> int:
        return len(self._all)

    def subscribe(self, keys: Iterable[str], prefixes: Iterable[str]) -> Watcher:
        watcher = Watcher(frozenset(keys), tuple(prefixes), self.buffer_limit)
        self._all.add(watcher)
        for key in watcher.keys:
            self._by_key.setdefault(key, set()).add(watcher)
        if watcher.prefixes:
            self._prefix_watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._all.discard(watcher)
        self._prefix_watchers.discard(watcher)
        for key in watcher.keys:
            subscribers = self._by_key.get(key)
            if subscribers is not None:
                subscribers.discard(watcher)
                if not subscribers:
                    del self._by_key[key]

    def publish(self, change: Change) -> None:
        """Store listener: called synchronously for every change, in order."""
        if not self._all:
            return
        exact = self._by_key.get(change.key)
        if exact:
            for watcher in exact:
                watcher.push(change)
        for watcher in self._prefix_watchers:
            if (not exact or watcher not in exact) and any(
                change.key.startswith(p) for p in watcher.prefixes
            ):
                watcher.push(change)

    def close_where(self, ends: Callable[[Watcher], bool]) -> None:
        """Close the watchers for which ``ends(watcher)`` is true."""
        for watcher in [w for w in self._all if ends(w)]:
            watcher.close()

    def close_all(self) -> None:
        for watcher in list(self._all):
            watcher.close()
