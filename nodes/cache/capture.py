"""A store's entries as they were at one revision, read while the store goes on changing.

A snapshot of a big group is sent a chunk at a time, the event loop free in
between, and the group takes writes meanwhile. Copying its map first held the
loop for the whole copy: 105-130 ms for a million keys in a busy node (20 ms in
a quiet process), the longest pause a catch-up caused. A `Capture` lists the
keys instead (25-30 ms in the same node) and reads each entry when its turn
comes: from the store if the key has not changed since, else the entry the key
held before its first change, which the store hands every open capture as it
applies the change (`Holdings.apply`). Entries are immutable tuples, so an
entry read late is the entry as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from nodes.cache.model import Entry

__all__ = ["Capture"]


class Capture:
    """The entries held at ``revision``, for as long as the capture is referenced
    (the store keeps only a weak reference: a snapshot abandoned halfway costs
    nothing after)."""

    __slots__ = ("__weakref__", "_before", "_data", "_keys", "revision")

    def __init__(self, revision: int, data: Mapping[str, Entry]) -> None:
        self.revision = revision
        self._data = data
        self._keys = list(data)
        self._before: dict[str, Entry | None] = {}

    def changing(self, key: str, old: Entry | None) -> None:
        """``key``, holding ``old`` (None: nothing), is about to change."""
        if key not in self._before:
            self._before[key] = old

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Every entry held at the capture, in the store's order then."""
        data, before = self._data, self._before
        for key in self._keys:
            entry = before[key] if key in before else data.get(key)
            if entry is None:  # held then and unchanged since: the store was dropped
                raise RuntimeError("the cache store was dropped while a snapshot of it "
                                   "was being read")
            yield key, entry
