"""A store's entries as they were at one revision, read while the store goes on changing.

A snapshot of a big group is sent a chunk at a time, the event loop free in
between, and the group takes writes meanwhile. Copying its map first held the
loop for the whole copy: 105-130 ms for a million keys in a busy node; listing
just its keys still took 18-61 ms. A `Capture` takes nothing when it is made:
it reads the store's map a shard at a time as the chunks are made (see
`nodes/cache/keymap.py`), and for the keys of a shard not read yet that change
meanwhile it keeps the entry each held before its first change (None: it did
not exist), which the store hands every open capture as it applies the change
(`Holdings.apply`). A shard read is then the state at the capture: its keys
now, less those changed since, plus the entries those held. Entries are
immutable tuples, so an entry read late is the entry as it was.

While a capture is open the map does not split its shards (`KeyMap.holds`), so
a key stays in the shard it was in; the shards grow a little meanwhile and
split once it is closed.
"""

from __future__ import annotations

from collections.abc import Iterator

from nodes.cache.keymap import KeyMap
from nodes.cache.model import Entry

__all__ = ["Capture"]


class Capture:
    """The entries held at ``revision``, for as long as the capture is referenced
    (the store keeps only a weak reference: a snapshot abandoned halfway costs
    nothing after)."""

    __slots__ = ("__weakref__", "_before", "_data", "_dropped", "_holding", "_next", "revision")

    def __init__(self, revision: int, data: KeyMap[Entry]) -> None:
        self.revision = revision
        self._data = data
        data.holds += 1
        self._holding = True
        self._next = 0  # the shards before it are read: their changes no longer matter
        # shard index -> key -> the entry before its first change since the capture.
        self._before: dict[int, dict[str, Entry | None]] = {}
        self._dropped = False

    def changing(self, key: str, old: Entry | None) -> None:
        """``key``, holding ``old`` (None: nothing), is about to change."""
        index = self._data.index(key)
        if index >= self._next:
            self._before.setdefault(index, {}).setdefault(key, old)

    def dropped(self) -> None:
        """The store was emptied (its group left this node): reading on fails."""
        self._dropped = True
        self._release()

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Every entry held at the capture, a shard at a time."""
        try:
            for index in range(len(self._data.shards)):  # no split while we hold the map
                if self._dropped:
                    raise RuntimeError("the cache store was dropped while a snapshot of it "
                                       "was being read")
                # In one step: the shard as it is now, and what changed in it since.
                now = list(self._data.shards[index].items())
                before = self._before.pop(index, {})
                self._next = index + 1
                for key, entry in now:
                    if key not in before:
                        yield key, entry
                for key, old in before.items():
                    if old is not None:
                        yield key, old
        finally:
            self._release()

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._data.holds -= 1

    def __del__(self) -> None:  # abandoned halfway (or never read)
        self._release()
