"""Keys in the order of their last use, in shards: what LRU (and LFU's ties) evict by.

One OrderedDict of a million keys rebuilt its table in one step of 150-210 ms
as it grew or as evicted keys' slots ran out (see `nodes/cache/keymap.py`).
`RecencyOrder` keeps a `KeyMap` of OrderedDict shards instead, each in its own
order of use, and stamps every use with a counter, so the oldest key of all is
the oldest of the shards' oldest: a `ShardFirsts` of the shards' first stamps
finds it without visiting every shard. The order is exact, as one OrderedDict's
was.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator

from nodes.cache.firsts import ShardFirsts
from nodes.cache.keymap import KeyMap

__all__ = ["RecencyOrder"]


class RecencyOrder:
    """A set of keys ordered by last use, oldest first."""

    __slots__ = ("_firsts", "_keys", "_stamp")

    def __init__(self, shard_keys: int | None = None) -> None:
        # key -> stamp of its last use; each shard's order is its keys' stamp order.
        self._keys: KeyMap[int] = KeyMap(OrderedDict, shard_keys)
        self._keys.on_split(self._split)
        self._stamp = 0
        self._firsts: ShardFirsts[int] = ShardFirsts(self._first_stamp,
                                                      lambda: len(self._keys.shards))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def use(self, key: str) -> None:
        """Make ``key`` the most recently used (adding it if it is not held)."""
        stamp = self._stamp = self._stamp + 1
        keys = self._keys
        shard = keys.shard(key)
        if key in shard:
            shard.move_to_end(key)  # type: ignore[attr-defined]
            shard[key] = stamp
        elif shard:
            keys[key] = stamp  # may split a shard (see _split)
        else:
            keys[key] = stamp
            self._firsts.add(stamp, keys.index(key))

    def discard(self, key: str) -> None:
        """Forget ``key``; one not held is ignored."""
        self._keys.pop(key, None)

    def clear(self) -> None:
        """Forget every key."""
        self._keys.clear()
        self._firsts.clear()

    def oldest(self) -> str | None:
        """The least recently used key, or None when empty."""
        found = self._firsts.smallest()
        return None if found is None else next(iter(self._keys.shards[found[1]]))

    def __iter__(self) -> Iterator[str]:
        """Every key, least recently used first. Do not change the order meanwhile."""
        shards = self._keys.shards
        if len(shards) == 1:
            yield from shards[0]
            return
        first = self.oldest()  # the usual reader wants one: skip the merge for it
        if first is None:
            return
        yield first
        merged = heapq.merge(*(((stamp, key) for key, stamp in shard.items())
                               for shard in shards))
        for _, key in merged:
            if key != first:
                yield key

    def _first_stamp(self, index: int) -> int | None:
        shard = self._keys.shards[index]
        return next(iter(shard.values())) if shard else None

    def _split(self, old: int, new: int) -> None:
        # Shard `old` kept some of its keys in their order, so its first stamp did
        # not go down and its entry still bounds it; the new shard needs one.
        stamp = self._first_stamp(new)
        if stamp is not None:
            self._firsts.add(stamp, new)
