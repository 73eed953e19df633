"""A str-keyed map that grows a shard at a time, so no insert rebuilds all of it.

A Python dict grows, and clears out the slots of deleted keys, by rebuilding its
whole table in one step. For a cache store's map that step is a stall of the
node's event loop that grows with the store: measured on a `CacheStore`, the
write that took it past 1,398,101 keys held the loop 220-250 ms (the map and
the LRU's OrderedDict rebuilding together), and a store of 750,000 keys, full
to ``max_entries`` and evicting as new keys came, 130-160 ms again every few
hundred thousand writes. Redis rehashes incrementally; a Python dict cannot,
so the map is split.

`KeyMap` spreads its keys over shards by linear hashing (Litwin, 1980): once it
holds more than ``shard_keys`` keys per shard on average, the next shard in turn
splits in two, by one more bit of the key's hash. Shards hold about
``shard_keys`` keys each (at most about twice that), whatever the map's size, so
the longest step is a split or a resize of one shard: a few milliseconds.
A map of up to ``shard_keys`` keys is one plain dict.

Structures kept per shard beside the map (an expiry heap, a recency order) hear
of each split (`on_split`) and split theirs the same way, with `index`.

The shard of a key depends on ``hash(key)``, which differs from process to
process: iteration order is this process's own. Nothing replicated depends on
it (a group's changes are decided on its primary and sent as they are).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from itertools import chain
from typing import Final, TypeVar

__all__ = ["SHARD_KEYS", "KeyMap"]

V = TypeVar("V")

SHARD_KEYS = 4096
"""Keys per shard, on average, before the next shard splits. A split copies one
shard (4,000-8,000 keys) in 2-5 ms (a dict's; an OrderedDict's is the slower);
fewer keys per shard mean more shards where all are looked at (a walk of every
key, and the small heaps that find the oldest key or the next expiry among the
shards' first ones). Tests set it lower (read when a map is made)."""

_MISSING: Final = object()


class KeyMap(MutableMapping[str, V]):
    """A ``str -> V`` map in shards (plain dicts, or what ``factory`` makes: an
    OrderedDict keeps each shard's order, and a split keeps it in both halves)."""

    __slots__ = ("_factory", "_high", "_len", "_limit", "_listeners", "_mask", "_next",
                 "_shard_keys", "holds", "shards")

    def __init__(self, factory: Callable[[], dict[str, V]] = dict,
                 shard_keys: int | None = None) -> None:
        """``shard_keys``: None for `SHARD_KEYS` as it is when the map is made."""
        if shard_keys is None:
            shard_keys = SHARD_KEYS
        if shard_keys < 1:
            raise ValueError("shard_keys must be at least 1")
        self._factory = factory
        self._shard_keys = shard_keys
        self.shards: list[dict[str, V]] = [factory()]
        """The shards, in index order; read them, never add or drop one."""
        # Linear hashing: shard = hash & _mask, or hash & _high for the shards
        # below _next, which have split already in this round.
        self._mask = 0
        self._high = 1
        self._next = 0
        self._len = 0
        self._limit = shard_keys  # keys before the next split: shard_keys per shard
        self.holds = 0
        """While above zero no shard splits (a `Capture` is reading them in turn);
        after, each new key splits one more shard until the map is back in shape."""
        self._listeners: list[Callable[[int, int], None]] = []

    def index(self, key: str) -> int:
        """The index of the shard that holds (or would hold) ``key``."""
        h = hash(key)
        i = h & self._mask
        return h & self._high if i < self._next else i

    def shard(self, key: str) -> dict[str, V]:
        """The shard that holds (or would hold) ``key``; add keys through the map."""
        h = hash(key)
        i = h & self._mask
        return self.shards[h & self._high if i < self._next else i]

    def on_split(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(old, new)`` after shard ``old`` split: its keys are now
        in shards ``old`` and ``new`` (a new last shard), `index` already says which."""
        self._listeners.append(listener)

    # -- the mapping -----------------------------------------------------------

    def get(self, key: str, default: V | None = None) -> V | None:  # type: ignore[override]
        h = hash(key)
        i = h & self._mask
        return self.shards[h & self._high if i < self._next else i].get(key, default)

    def __getitem__(self, key: str) -> V:
        h = hash(key)
        i = h & self._mask
        return self.shards[h & self._high if i < self._next else i][key]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        h = hash(key)
        i = h & self._mask
        return key in self.shards[h & self._high if i < self._next else i]

    def __setitem__(self, key: str, value: V) -> None:
        h = hash(key)
        i = h & self._mask
        shard = self.shards[h & self._high if i < self._next else i]
        if key in shard:
            shard[key] = value
            return
        shard[key] = value
        self._len += 1
        if self._len > self._limit and not self.holds:
            self._split()

    def __delitem__(self, key: str) -> None:
        h = hash(key)
        i = h & self._mask
        del self.shards[h & self._high if i < self._next else i][key]
        self._len -= 1

    def pop(self, key: str, default: object = _MISSING) -> V:
        h = hash(key)
        i = h & self._mask
        shard = self.shards[h & self._high if i < self._next else i]
        if key in shard:
            self._len -= 1
            return shard.pop(key)
        if default is _MISSING:
            raise KeyError(key)
        return default  # type: ignore[return-value]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        """Every key, shard after shard (each shard in its own order)."""
        if len(self.shards) == 1:
            return iter(self.shards[0])
        return chain.from_iterable(self.shards)

    def items(self) -> Iterator[tuple[str, V]]:  # type: ignore[override]
        """Every ``(key, value)``, shard after shard."""
        return chain.from_iterable(shard.items() for shard in self.shards)

    def clear(self) -> None:
        """Forget every key (the shards stay, empty, as what is kept per shard does)."""
        for shard in self.shards:
            shard.clear()
        self._len = 0

    # -- growing -----------------------------------------------------------------

    def _split(self) -> None:
        """Split the next shard in turn by one more bit of its keys' hashes."""
        old = self._next
        high = self._high
        source = self.shards[old]
        stay = self._factory()
        move = self._factory()
        for key, value in source.items():
            if hash(key) & high == old:
                stay[key] = value
            else:
                move[key] = value
        self.shards[old] = stay
        self.shards.append(move)
        self._limit += self._shard_keys
        self._next += 1
        if self._next > self._mask:  # every shard of this round has split: the next
            self._mask = high
            self._high = (high << 1) | 1
            self._next = 0
        new = len(self.shards) - 1
        for listener in self._listeners:
            listener(old, new)
