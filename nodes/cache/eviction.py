"""Eviction policies: which key a full cache gives up first.

A policy only orders keys; it holds no values and makes no decision about *when*
to evict. The store tells it about every write (`on_insert`, which also carries the
key's expiry), read (`on_access`) and removal (`on_remove`), and asks it for
victims in order (`candidates`) or just the first one (`victim`).

All hooks are O(1) (O(log shards) to find an LRU or LFU victim among a big
store's shards, see `nodes/cache/recency.py`; volatile-ttl reads the store's
expiry index). Policies are deterministic: the same calls yield the same victims,
however a process happens to shard the keys. (Victims are chosen on a group's
primary and reach its replicas as the changes that evict them.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

from nodes.cache.expiry import ExpiryIndex
from nodes.cache.keymap import KeyMap
from nodes.cache.recency import RecencyOrder

__all__ = [
    "POLICY_NAMES",
    "EvictionPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "NoEvictionPolicy",
    "VolatileTTLPolicy",
    "make_policy",
]


class EvictionPolicy(ABC):
    """Orders the keys of one store for eviction.

    Contract with the store:

    * ``on_insert(key, expire_at)`` after every write of ``key`` -- both a new key
      and an overwrite of a tracked one (an overwrite counts as a use and updates
      the expiry). ``expire_at`` is the absolute expiry or None.
    * ``on_access(key)`` after every successful read of a tracked key.
    * ``on_remove(key)`` when the key leaves the store (delete, expiry, eviction).
      Unknown keys are ignored.
    * ``victim()`` the key to evict first, or None when the policy offers none.
      It does not remove the key: the store evicts it and then calls on_remove.
    * ``candidates()`` every evictable key, best victim first, lazily. The store
      must not call the other hooks while iterating.
    * ``clear()`` when the store drops every key at once (its group left).
    """

    __slots__ = ()

    name: ClassVar[str]

    @abstractmethod
    def on_insert(self, key: str, expire_at: int | None = None) -> None:
        """Record a write of ``key`` (new or overwritten) expiring at ``expire_at``."""

    @abstractmethod
    def on_access(self, key: str) -> None:
        """Record a read of a tracked ``key``."""

    @abstractmethod
    def on_remove(self, key: str) -> None:
        """Forget ``key``; a key the policy does not track is ignored."""

    @abstractmethod
    def victim(self) -> str | None:
        """The key to evict first, or None when there is no candidate."""

    @abstractmethod
    def candidates(self) -> Iterator[str]:
        """All evictable keys, best victim first."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of evictable keys."""

    @abstractmethod
    def clear(self) -> None:
        """Forget every key."""


class LRUPolicy(RecencyOrder, EvictionPolicy):
    """Least recently used (read or written) first: a `RecencyOrder` whose uses
    are the store's reads and writes (its own methods, so a read costs one call)."""

    __slots__ = ()

    name = "lru"

    def on_insert(self, key: str, expire_at: int | None = None) -> None:
        self.use(key)

    on_access = RecencyOrder.use
    on_remove = RecencyOrder.discard
    victim = RecencyOrder.oldest
    clear = RecencyOrder.clear

    def candidates(self) -> Iterator[str]:
        return iter(self)


class _Bucket:
    """The keys used exactly ``freq`` times, least recently used first.

    Buckets form a circular doubly linked list in increasing ``freq`` order, so
    the lowest frequency, and the next one up, are always one step away.
    """

    __slots__ = ("freq", "keys", "next", "prev")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self.keys = RecencyOrder()
        self.prev: _Bucket = self
        self.next: _Bucket = self


class LFUPolicy(EvictionPolicy):
    """Least frequently used first; ties go to the least recently used.

    O(1) for every hook (the constant-time LFU of Shah, Mitra and Matani): a
    linked list of frequency buckets, each a `RecencyOrder`.
    Removing an arbitrary key never requires a search for the next minimum.
    A write counts as a use, as a read does; a new key starts at frequency 1.
    """

    __slots__ = ("_bucket_of", "_head")

    name = "lfu"

    def __init__(self) -> None:
        self._head = _Bucket(0)  # sentinel; head.next is the lowest frequency
        self._bucket_of: KeyMap[_Bucket] = KeyMap()

    @staticmethod
    def _insert_after(prev: _Bucket, freq: int) -> _Bucket:
        bucket = _Bucket(freq)
        nxt = prev.next
        bucket.prev = prev
        bucket.next = nxt
        prev.next = bucket
        nxt.prev = bucket
        return bucket

    @staticmethod
    def _unlink(bucket: _Bucket) -> None:
        bucket.prev.next = bucket.next
        bucket.next.prev = bucket.prev

    def on_insert(self, key: str, expire_at: int | None = None) -> None:
        if key in self._bucket_of:
            self.on_access(key)
            return
        head = self._head
        first = head.next
        if first is head or first.freq != 1:
            first = self._insert_after(head, 1)
        first.keys.use(key)
        self._bucket_of[key] = first

    def on_access(self, key: str) -> None:
        bucket = self._bucket_of[key]
        target = bucket.next
        freq = bucket.freq + 1
        if target is self._head or target.freq != freq:
            if len(bucket.keys) == 1:
                bucket.freq = freq  # alone in its bucket: bump it in place, order holds
                return
            target = self._insert_after(bucket, freq)
        bucket.keys.discard(key)
        target.keys.use(key)
        self._bucket_of[key] = target
        if not bucket.keys:
            self._unlink(bucket)

    def on_remove(self, key: str) -> None:
        bucket = self._bucket_of.pop(key, None)
        if bucket is None:
            return
        bucket.keys.discard(key)
        if not bucket.keys:
            self._unlink(bucket)

    def victim(self) -> str | None:
        first = self._head.next
        if first is self._head:
            return None
        return first.keys.oldest()

    def candidates(self) -> Iterator[str]:
        head = self._head
        bucket = head.next
        while bucket is not head:
            yield from bucket.keys
            bucket = bucket.next

    def clear(self) -> None:
        # Each bucket too: they link to each other in a ring, so dropped with
        # their keys they would wait for the cyclic garbage collector.
        head = self._head
        bucket = head.next
        while bucket is not head:
            bucket.keys.clear()
            bucket = bucket.next
        head.next = head.prev = head
        self._bucket_of.clear()

    def frequency(self, key: str) -> int:
        """How many times ``key`` was used (0 if untracked); for tests and stats."""
        bucket = self._bucket_of.get(key)
        return 0 if bucket is None else bucket.freq

    def __len__(self) -> int:
        return len(self._bucket_of)


class VolatileTTLPolicy(EvictionPolicy):
    """Among keys with an expiry, the one expiring soonest first (equal expiries
    by key). Keys without an expiry are never candidates.

    It keeps nothing of its own: the store's `ExpiryIndex` already orders exactly
    these keys (a heap and a map of its own cost every key with an expiry twice
    and were compacted in one step).
    """

    __slots__ = ("_expiry",)

    name = "volatile-ttl"

    def __init__(self, expiry: ExpiryIndex) -> None:
        self._expiry = expiry

    def on_insert(self, key: str, expire_at: int | None = None) -> None:
        pass

    def on_access(self, key: str) -> None:
        pass

    def on_remove(self, key: str) -> None:
        pass

    def clear(self) -> None:
        pass  # its keys are the expiry index's, cleared with it

    def victim(self) -> str | None:
        return self._expiry.soonest()

    def candidates(self) -> Iterator[str]:
        return self._expiry.keys_in_order()

    def __len__(self) -> int:
        return self._expiry.volatile


class NoEvictionPolicy(EvictionPolicy):
    """Never evicts: a write over the limit fails."""

    __slots__ = ()

    name = "noeviction"

    def on_insert(self, key: str, expire_at: int | None = None) -> None:
        pass

    def on_access(self, key: str) -> None:
        pass

    def on_remove(self, key: str) -> None:
        pass

    def clear(self) -> None:
        pass

    def victim(self) -> str | None:
        return None

    def candidates(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, VolatileTTLPolicy, NoEvictionPolicy)
}

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
"""The accepted policy names: "lru", "lfu", "volatile-ttl", "noeviction"."""


def make_policy(name: str, expiry: ExpiryIndex) -> EvictionPolicy:
    """A fresh policy by name (case-insensitive; "_" may stand for "-") for the
    store whose expiry index is ``expiry``."""
    cls = _POLICIES.get(name.strip().lower().replace("_", "-"))
    if cls is None:
        raise ValueError(
            f"unknown eviction policy {name!r}; expected one of {', '.join(POLICY_NAMES)}"
        )
    if cls is VolatileTTLPolicy:
        return VolatileTTLPolicy(expiry)
    return cls()
