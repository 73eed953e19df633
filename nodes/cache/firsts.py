"""The smallest of a sharded structure's per-shard first values, found in O(log shards).

Both the LRU order (`recency.py`: each shard's oldest stamp) and the expiry index
(`expiry.py`: each heap's soonest item) need the least of their shards' firsts
after every change, and a change to one shard should not cost a visit to all.
`ShardFirsts` keeps a heap of ``(value, shard)`` entries, updated lazily: a
shard's first only grows between the times it is told (`add`) of a smaller one,
so an entry is a lower bound, and one that no longer equals its shard's first is
refreshed (or dropped, the shard being empty) when it reaches the top.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["ShardFirsts"]

T = TypeVar("T", bound=Any)  # comparable, and no two shards' firsts are equal


class ShardFirsts(Generic[T]):
    """A lazily kept heap of each shard's first value."""

    __slots__ = ("_bound_of", "_first_of", "_heap", "_shards")

    def __init__(self, first_of: Callable[[int], T | None], shards: Callable[[], int],
                 bound_of: Callable[[int], T | None] | None = None) -> None:
        """``first_of(i)``: shard ``i``'s first value now (None: it holds nothing);
        ``shards()``: how many shards there are; ``bound_of(i)``, if finding a
        first costs work (the expiry index drops stale items to find one), a
        cheap value no greater than it, for starting afresh over every shard."""
        self._first_of = first_of
        self._bound_of = first_of if bound_of is None else bound_of
        self._shards = shards
        self._heap: list[tuple[T, int]] = []

    def add(self, value: T, index: int) -> None:
        """Shard ``index``'s first may have become ``value``: smaller than before,
        or its first at all (a new or emptied shard took a value)."""
        heap = self._heap
        heapq.heappush(heap, (value, index))
        if len(heap) > 2 * self._shards() + 8:
            # Entries left behind by shards that since lost their first: start afresh.
            self._heap = [(bound, i) for i in range(self._shards())
                          if (bound := self._bound_of(i)) is not None]
            heapq.heapify(self._heap)

    def smallest(self) -> tuple[T, int] | None:
        """``(value, shard)`` of the least first of all shards, or None if all are empty."""
        heap = self._heap
        while heap:
            value, index = heap[0]
            first = self._first_of(index)
            if first is None:
                heapq.heappop(heap)
            elif first != value:
                heapq.heapreplace(heap, (first, index))
            else:
                return value, index
        return None

    def clear(self) -> None:
        """Forget every entry (every shard is empty)."""
        self._heap = []
