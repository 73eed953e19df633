"""The cache store's expiry index: which keys expire when, found in O(due) time.

`ExpiryIndex` keeps a min-heap of ``(expire_at, key, version)`` items, one pushed
by every write that sets an expiry. It never owns entries: it reads the store's
own ``key -> Entry`` mapping to tell whether an item is still live (the key still
holds exactly that version), and it never removes keys; the store does that,
telling the index through `ExpiryIndex.discard`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping

from nodes.cache.model import VERSION, Entry

__all__ = ["ExpiryIndex"]


class ExpiryIndex:
    """A heap of (expire_at, key, version) over a store's entries, deleted lazily.

    An item is live while ``data[key][VERSION] == version``; any other item is
    stale (its key was deleted, expired, evicted or rewritten since) and is
    skipped wherever it is met, and dropped by compaction.
    """

    # Deletion is lazy because a heap cannot remove an arbitrary item cheaply:
    # finding it is O(n). Every delete, overwrite and removal would pay that,
    # so instead they only make the item stale (an O(1) count update), the few
    # readers skip stale items, and compaction bounds the memory they hold.

    __slots__ = ("_data", "_heap", "_volatile")

    def __init__(self, data: Mapping[str, Entry]) -> None:
        """Index over ``data``, the store's live mapping (read, never written)."""
        self._data = data
        self._heap: list[tuple[int, str, int]] = []
        self._volatile = 0  # entries with an expiry: the live items in _heap

    def __len__(self) -> int:
        """Items held, stale ones included (what compaction keeps bounded)."""
        return len(self._heap)

    def push(self, expire_at: int, key: str, version: int, *, replacing: bool = False) -> None:
        """Index the write ``version`` of ``key``, which expires at ``expire_at``.

        ``replacing``: the key's previous version also had an expiry and is being
        overwritten, so its item goes stale and the volatile count stays the same
        (saves the store a separate `discard` call on that path).
        """
        if not replacing:
            self._volatile += 1
        heap = self._heap
        heapq.heappush(heap, (expire_at, key, version))
        if len(heap) > 2 * self._volatile + 64:
            self._compact()

    def discard(self) -> None:
        """An entry with an expiry left the store or lost its expiry.

        Its item is now stale; it stays in the heap until met or compacted.
        """
        self._volatile -= 1

    def next_expiry(self) -> int | None:
        """When the next key expires (possibly already past), or None.

        Drops the stale items it finds at the top of the heap.
        """
        heap = self._heap
        data = self._data
        while heap:
            expire_at, key, version = heap[0]
            entry = data.get(key)
            if entry is not None and entry[VERSION] == version:
                return expire_at
            heapq.heappop(heap)
        return None

    def pop_due(self, now: int) -> tuple[str, Entry] | None:
        """Take the soonest live item due at ``now``, or None if nothing is due.

        Only the index forgets the item: the caller must remove the entry from
        the store (and `discard` it), or it will never be reported again.
        """
        heap = self._heap
        data = self._data
        while heap and heap[0][0] <= now:
            _, key, version = heapq.heappop(heap)
            entry = data.get(key)
            if entry is not None and entry[VERSION] == version:
                return key, entry
        return None

    def iter_due(self, now: int) -> Iterator[tuple[str, Entry]]:
        """Every held key whose expiry is <= now; changes nothing but dropping the
        stale items at the top of the heap before walking.

        Walks only the part of the heap tree that is due: O(due keys), once the
        stale items at the top are dropped. Do not push while iterating.
        """
        self.next_expiry()
        heap = self._heap
        data = self._data
        size = len(heap)
        stack = [0] if heap and heap[0][0] <= now else []
        while stack:
            index = stack.pop()
            expire_at, key, version = heap[index]
            if expire_at > now:
                continue
            entry = data.get(key)
            if entry is not None and entry[VERSION] == version:
                yield key, entry
            for child in (2 * index + 1, 2 * index + 2):
                if child < size:
                    stack.append(child)

    def _compact(self) -> None:
        """Rebuild the heap from its live items only."""
        data = self._data
        live = []
        for item in self._heap:
            entry = data.get(item[1])
            if entry is not None and entry[VERSION] == item[2]:
                live.append(item)
        heapq.heapify(live)
        self._heap = live
