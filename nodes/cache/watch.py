"""Fan-out of cache changes to Watch streams.

Each watcher has a bounded buffer. Appends never wait for a slow watcher: when
its buffer is full the change is dropped for that watcher only, but it still
consumes a sequence number, so the subscriber sees exactly how many it missed.
A stream that asked for heartbeats gets one whenever it has been idle for its
interval, carrying the watcher's current number (so a drop shows at once).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

import grpc

from common import heartbeat as hb
from common.errors import MeshStatusError, Reason
from common.tenancy import unscoped
from mesh.cache.v1 import cache_pb2 as pb
from nodes.cache.store import Change, ChangeType

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

    async def next_batch(self, heartbeat: float = 0.0) -> list[tuple[int, Change]] | None:
        """Wait for changes; an empty list means the watcher was closed, None that
        ``heartbeat`` seconds passed with nothing to send (0: wait as long as it takes)."""
        while not self._buffer and not self.closed:
            self._wakeup.clear()
            if not await hb.idle(self._wakeup, heartbeat):
                return None
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

    def end_for_groups(self, group_ids: set[int],
                       group_of: Callable[[str], int | None]) -> None:
        """Close the watchers that depend on ``group_ids`` (lost by this node): those
        with a key in one of them, and every prefix watcher (prefixes span groups)."""
        for watcher in list(self._all):
            if watcher.prefixes or any(group_of(k) in group_ids or group_of(k) is None
                                       for k in watcher.keys):
                watcher.close()

    async def stream(self, keys: Iterable[str], prefixes: Iterable[str], heartbeat: float = 0.0
                     ) -> AsyncIterator[pb.WatchResponse]:
        """One Watch stream: the created message, then numbered changes (and a
        heartbeat after every ``heartbeat`` idle seconds; 0: none) until the watcher
        is closed, then UNAVAILABLE (the client watches again)."""
        if len(self) >= self.max_watchers:
            raise MeshStatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this node already serves {self.max_watchers} watches", Reason.WATCH_LIMIT)
        watcher = self.subscribe(keys, prefixes)
        try:
            created = pb.WatchResponse(seq=0, created=True, revision=0)
            if heartbeat > 0:
                created.heartbeat_interval.CopyFrom(hb.as_duration(heartbeat))
            yield created
            while (batch := await watcher.next_batch(heartbeat)) != []:
                if batch is None:
                    yield pb.WatchResponse(seq=watcher.seq,
                                           heartbeat=pb.WatchHeartbeat(server_time=hb.now()))
                    continue
                for seq, change in batch:
                    yield pb.WatchResponse(seq=seq, event=_event(change),
                                           revision=change.revision)
        finally:
            self.unsubscribe(watcher)
        raise MeshStatusError(
            grpc.StatusCode.UNAVAILABLE,
            "the watch ended: the node is shutting down or no longer leads these keys; "
            "watch again (at their new owner)", Reason.GROUP_UNAVAILABLE)

    def close_all(self) -> None:
        for watcher in list(self._all):
            watcher.close()


_EVENT_TYPES = {
    ChangeType.SET: pb.EVENT_TYPE_SET,
    ChangeType.DELETE: pb.EVENT_TYPE_DELETE,
    ChangeType.EXPIRE: pb.EVENT_TYPE_EXPIRE,
    ChangeType.EVICT: pb.EVENT_TYPE_EVICT,
}


def _event(change: Change) -> pb.WatchEvent:
    event = pb.WatchEvent(type=_EVENT_TYPES[change.type], key=unscoped(change.key),
                          value=change.value, revision=change.revision)
    if change.expire_at is not None and change.type is ChangeType.SET:
        event.expire_time.FromNanoseconds(change.expire_at)
    return event
