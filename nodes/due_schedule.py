"""`DueSchedule`: keys by when something may be due for them, for periodic passes.

A primary's periodic pass (retention by age, scavenging) that looked at every
log or stream it holds cost in proportion to all of them, in one step of the
loop. With a schedule it takes only what came due: each key goes in at the
earliest time something may be due for it, and the pass looks at those, then
puts each back at its next due time. An entry may come early (the caller looks
and puts it back), never late: whatever makes a key due sooner must `add` it.
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

__all__ = ["DueSchedule"]

K = TypeVar("K")


class DueSchedule(Generic[K]):
    """A heap of ``(due, key)``; a key is in once at its earliest due time."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, K]] = []
        self._at: dict[K, int] = {}  # key -> its earliest entry in the heap

    def add(self, key: K, due: int) -> None:
        """Put ``key`` in at ``due``, unless it is in already at that time or sooner."""
        at = self._at.get(key)
        if at is None or due < at:
            self._at[key] = due
            heapq.heappush(self._heap, (due, key))

    def due(self, now: int) -> list[K]:
        """The keys due by ``now``, each once, taken out: the caller looks at each
        and adds back what still needs a look."""
        heap, at = self._heap, self._at
        found: dict[K, None] = {}
        while heap and heap[0][0] <= now:
            due, key = heapq.heappop(heap)
            if at.get(key) == due:
                del at[key]
            found[key] = None
        return list(found)
