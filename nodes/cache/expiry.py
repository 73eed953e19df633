"""The cache store's expiry index: which keys expire when, found in O(due) time.

`ExpiryIndex` keeps min-heaps of ``(expire_at, key, version)`` items, one pushed
by every write that sets an expiry. It never owns entries: it reads the store's
own ``key -> Entry`` map to tell whether an item is still live (the key still
holds exactly that version), and it never removes keys; the store does that,
telling the index through `ExpiryIndex.discard`.

There is one heap per shard of the store's `KeyMap`, split when the shard
splits, so that dropping stale items (compaction) goes over one shard's items
at a time: one heap of them all, at 750,000 keys with an expiry rewritten in
turn, was compacted in one step of 511 ms.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from nodes.cache.firsts import ShardFirsts
from nodes.cache.keymap import KeyMap
from nodes.cache.model import VERSION, Entry

__all__ = ["ExpiryIndex"]

Item = tuple[int, str, int]
"""``(expire_at, key, version)``."""


class ExpiryIndex:
    """Heaps of (expire_at, key, version) over a store's entries, deleted lazily.

    An item is live while ``data[key][VERSION] == version``; any other item is
    stale (its key was deleted, expired, evicted or rewritten since) and is
    skipped wherever it is met, and dropped by compaction.
    """

    # Deletion is lazy because a heap cannot remove an arbitrary item cheaply:
    # finding it is O(n). Every delete, overwrite and removal would pay that,
    # so instead they only make the item stale (an O(1) count update), the few
    # readers skip stale items, and compaction bounds the memory they hold.

    __slots__ = ("_data", "_heaps", "_items", "_live", "_soonest", "_volatile")

    def __init__(self, data: KeyMap[Entry]) -> None:
        """Index over ``data``, the store's live map (read, never written)."""
        self._data = data
        self._heaps: list[list[Item]] = [[] for _ in data.shards]
        self._live: list[int] = [0 for _ in data.shards]  # live items per heap
        self._volatile = 0  # entries with an expiry: the live items of all heaps
        self._items = 0  # items of all heaps, stale ones included
        # The heaps' first live items. Whole items, not just expiries, so equal
        # expiries come out by key whatever heaps their keys are in.
        self._soonest: ShardFirsts[Item] = ShardFirsts(
            self._first, lambda: len(self._heaps),
            lambda index: heap[0] if (heap := self._heaps[index]) else None)
        data.on_split(self._split)

    def __len__(self) -> int:
        """Items held, stale ones included (what compaction keeps bounded)."""
        return self._items

    @property
    def volatile(self) -> int:
        """Entries with an expiry (one live item each)."""
        return self._volatile

    def push(self, expire_at: int, key: str, version: int, *, replacing: bool = False) -> None:
        """Index the write ``version`` of ``key``, which expires at ``expire_at``.

        ``replacing``: the key's previous version also had an expiry and is being
        overwritten, so its item goes stale and the volatile count stays the same
        (saves the store a separate `discard` call on that path).
        """
        index = self._data.index(key)
        heap = self._heaps[index]
        if not replacing:
            self._volatile += 1
            self._live[index] += 1
        item = (expire_at, key, version)
        heapq.heappush(heap, item)
        self._items += 1
        if heap[0] is item:  # a new first of its heap
            self._soonest.add(item, index)
        if len(heap) > 2 * self._live[index] + 64:
            self._compact(index)

    def discard(self, key: str) -> None:
        """``key``'s entry, which had an expiry, left the store or lost its expiry.

        Its item is now stale; it stays in its heap until met or compacted.
        """
        self._volatile -= 1
        self._live[self._data.index(key)] -= 1

    def next_expiry(self) -> int | None:
        """When the next key expires (possibly already past), or None.

        Drops the stale items it finds at the top of the heaps.
        """
        found = self._soonest.smallest()
        return None if found is None else found[0][0]

    def clear(self) -> None:
        """Forget every item (the store's map was cleared)."""
        self._heaps = [[] for _ in self._data.shards]
        self._live = [0 for _ in self._data.shards]
        self._volatile = self._items = 0
        self._soonest.clear()

    def soonest(self) -> str | None:
        """The key that expires first (possibly already due), or None."""
        found = self._soonest.smallest()
        return None if found is None else found[0][1]

    def keys_in_order(self) -> Iterator[str]:
        """Every key with an expiry, soonest first (equal expiries by key); drops
        the stale items at the top of the heaps first. Do not push while iterating.

        Walks the heaps' trees together, best first: each key costs O(log n).
        """
        for item, _ in self._in_order():
            yield item[1]

    def pop_due(self, now: int) -> tuple[str, Entry] | None:
        """Take the soonest live item due at ``now``, or None if nothing is due.

        Only the index forgets the item: the caller must remove the entry from
        the store (and `discard` it), or it will never be reported again.
        """
        found = self._soonest.smallest()
        if found is None or found[0][0] > now:
            return None
        _, key, _ = heapq.heappop(self._heaps[found[1]])  # live: smallest() checked it
        self._items -= 1
        return key, self._data[key]

    def iter_due(self, now: int) -> Iterator[tuple[str, Entry]]:
        """Every held key whose expiry is <= now, soonest first; changes nothing but
        dropping the stale items at the top of the heaps before walking.

        Walks only the due part of the heaps' trees (and each heap's first item):
        O(shards + due keys x log). Do not push while iterating.
        """
        for item, entry in self._in_order():
            if item[0] > now:
                return
            yield item[1], entry

    # -- the heaps -------------------------------------------------------------

    def _first(self, index: int) -> Item | None:
        """Heap ``index``'s first live item, dropping the stale ones above it."""
        heap = self._heaps[index]
        data = self._data
        while heap:
            item = heap[0]
            entry = data.get(item[1])
            if entry is not None and entry[VERSION] == item[2]:
                return item
            heapq.heappop(heap)
            self._items -= 1
        return None

    def _in_order(self) -> Iterator[tuple[Item, Entry]]:
        """Every live item with its entry, soonest first: the heaps' trees walked
        together, best first (a child is never sooner than its parent)."""
        heaps = self._heaps
        data = self._data
        frontier = [(heap[0], index, 0) for index, heap in enumerate(heaps)
                    if self._first(index) is not None]
        heapq.heapify(frontier)
        while frontier:
            item, index, at = heapq.heappop(frontier)
            entry = data.get(item[1])
            if entry is not None and entry[VERSION] == item[2]:
                yield item, entry
            heap = heaps[index]
            for child in (2 * at + 1, 2 * at + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], index, child))

    def _compact(self, index: int) -> None:
        """Rebuild heap ``index`` from its live items only."""
        shard = self._data.shards[index]  # where every key of this heap lives
        heap = self._heaps[index]
        live = [item for item in heap
                if (entry := shard.get(item[1])) is not None and entry[VERSION] == item[2]]
        self._items -= len(heap) - len(live)
        # In place: a new list would be a young container of thousands of
        # references to old objects, which the next young collections walk.
        heap[:] = live
        heapq.heapify(heap)
        self._live[index] = len(heap)
        if heap:
            self._soonest.add(heap[0], index)

    def _split(self, old: int, new: int) -> None:
        """The store's shard ``old`` split into ``old`` and ``new``: so do the heaps."""
        data = self._data
        heap = self._heaps[old]
        kept, moved = data.shards[old], data.shards[new]
        stay: list[Item] = []
        move: list[Item] = []
        for item in heap:
            key = item[1]
            entry = kept.get(key)
            if entry is not None:
                if entry[VERSION] == item[2]:
                    stay.append(item)
            elif (entry := moved.get(key)) is not None and entry[VERSION] == item[2]:
                move.append(item)
            # else stale: dropped on the way
        self._items -= len(heap) - len(stay) - len(move)
        heap[:] = stay  # in place, as in _compact
        heapq.heapify(heap)
        heapq.heapify(move)
        self._heaps.append(move)
        self._live[old] = len(stay)
        self._live.append(len(move))
        for index in (old, new):
            if self._heaps[index]:
                self._soonest.add(self._heaps[index][0], index)
