"""What a cache store holds, and the one way it changes: applying a `Change`.

`Holdings` owns the entries and everything kept in step with them: the byte
count and the node's `Budget`, the `ExpiryIndex` (what expires when), the
eviction policy's order, the revision counter and the `ChangeFeed` that reports
each change. Every mutation goes through `Holdings.apply` (a SET, DELETE,
EXPIRE or EVICT decided beforehand), on the group's primary and on its replicas
alike, so their copies cannot drift apart. `CacheStore` (nodes/cache/store.py)
builds the cache's operations and rules on top: it decides, then proposes the
changes. `export` / `load` copy a whole store.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

from common.clock import SYSTEM_CLOCK
from nodes.cache.budget import Budget
from nodes.cache.capture import Capture
from nodes.cache.eviction import EvictionPolicy, make_policy
from nodes.cache.expiry import ExpiryIndex
from nodes.cache.feed import ChangeFeed
from nodes.cache.keymap import KeyMap
from nodes.cache.model import EXPIRE_AT, VALUE, VERSION, Change, ChangeType, Entry
from nodes.cache.room import entry_size

__all__ = ["Holdings"]

_SET = ChangeType.SET
_EXPIRE = ChangeType.EXPIRE
_EVICT = ChangeType.EVICT


class Holdings:
    """Entries with their indexes, counters and change feed."""

    __slots__ = (
        "_budget",
        "_bytes",
        "_captures",
        "_clock",
        "_data",
        "_evictions",
        "_expirations",
        "_expiry",
        "_feed",
        "_flush",
        "_hits",
        "_misses",
        "_policy",
        "_publish",
        "_revision",
        "_touch",
    )

    def __init__(
        self,
        *,
        max_entries: int = 0,
        max_bytes: int = 0,
        policy: str = "lru",
        clock: Callable[[], int] = SYSTEM_CLOCK.wall_ns,
        budget: Budget | None = None,
    ) -> None:
        # Limits are checked against ``budget`` (shared by a node's stores) when
        # given, else against a budget of this store's own.
        self._budget = budget if budget is not None else Budget(max_entries, max_bytes)
        self._data: KeyMap[Entry] = KeyMap()
        self._expiry = ExpiryIndex(self._data)  # reads _data: never rebind it
        self._policy: EvictionPolicy = make_policy(policy, self._expiry)
        self._touch = self._policy.on_access
        self._clock = clock
        self._feed = ChangeFeed()
        # Bound once, like _touch: the write path pays one attribute read for each.
        self._publish = self._feed.publish
        self._flush = self._feed.flush
        self._captures: weakref.WeakSet[Capture] = weakref.WeakSet()  # snapshots being read
        self._bytes = 0  # everything held, expired-but-unswept included
        self._revision = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0

    @property
    def revision(self) -> int:
        """The number of state changes so far (the revision of the last one)."""
        return self._revision

    # -- applying changes -----------------------------------------------------

    def apply(self, change: Change) -> Entry | None:
        """Make ``change``, decided beforehand (by this store's operations or the
        group's primary); returns the entry a SET wrote, else None.

        Nothing here reads the clock, checks a limit or asks the eviction policy:
        the decision is the change's, so every copy that applies the same
        changes holds the same entries, counters and revision. The change's
        revision becomes the store's, so versions keep growing after a
        promotion. The change is queued for listeners, who get it at the end of
        the operation that made it (`mirror`: at once).
        """
        key = change.key
        old = self._data.get(key)
        if self._data.holds:  # a capture is open (an int: cheaper than the WeakSet's len)
            for capture in self._captures:
                capture.changing(key, old)
        revision = change.revision
        if revision > self._revision:
            self._revision = revision
        entry: Entry | None = None
        kind = change.type
        if kind is _SET:
            value = change.value
            expire_at = change.expire_at
            entry = (value, revision, expire_at)
            self._data[key] = entry
            budget = self._budget
            size = entry_size(key, value)
            if old is None:
                budget.entries += 1
                if expire_at is not None:
                    self._expiry.push(expire_at, key, revision)
            else:  # an overwrite, which the policy counts as a use
                size -= entry_size(key, old[VALUE])
                if expire_at is not None:
                    # An old expiry's item just goes stale: the volatile count stays.
                    self._expiry.push(expire_at, key, revision,
                                      replacing=old[EXPIRE_AT] is not None)
                elif old[EXPIRE_AT] is not None:
                    self._expiry.discard(key)
            self._bytes += size
            budget.bytes += size
            self._policy.on_insert(key, expire_at)
        elif old is not None:
            self._drop(key, old)
            if kind is _EXPIRE:
                self._expirations += 1
            elif kind is _EVICT:
                self._evictions += 1
        if self._feed.listeners:
            self._publish(change)
        return entry

    def mirror(self, change: Change) -> Entry | None:
        """`apply` one change and deliver it to listeners at once (a replica's step)."""
        entry = self.apply(change)
        self._flush()
        return entry

    def export(self) -> tuple[int, list[tuple[str, Entry]]]:
        """A consistent copy of the state: ``(revision, [(key, entry), ...])``.

        Entries are immutable, so the copy is a list of references, taken in one
        step (no await can interleave a write).
        """
        return self._revision, list(self._data.items())

    def capture(self) -> Capture:
        """The state now, to be read a piece at a time while changes go on (see
        `Capture`): nothing is copied in this step."""
        capture = Capture(self._revision, self._data)
        self._captures.add(capture)
        return capture

    def load(self, revision: int, items: Iterable[tuple[str, Entry]]) -> None:
        """Add entries of another copy (`export` output, or a piece of a snapshot)
        for keys this store does not hold; the revision becomes ``revision``."""
        for key, entry in items:
            self._insert(key, entry)
        self._revision = revision

    def release(self) -> None:
        """Drop everything without changes (the group left this node), and give its
        room back to the budget. The store is not used afterwards."""
        self._budget.entries -= len(self._data)
        self._budget.bytes -= self._bytes
        for capture in self._captures:
            capture.dropped()
        self._data.clear()
        self._bytes = 0
        # The indexes too, now: the store sits in reference cycles (its machine's
        # propose), so what it still held would wait for a full collection.
        self._expiry.clear()
        self._policy.clear()

    # -- listeners -----------------------------------------------------------

    def add_listener(self, fn: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``fn`` with every change, in revision order, after the state changed.

        Delivery is synchronous, at the end of the operation that caused it. A
        listener may call the store; the changes it causes are delivered after
        the ones already queued, so order holds for every listener. An exception
        from a listener is logged and does not reach the caller. Returns a
        function that unsubscribes (calling it again does nothing).
        """
        return self._feed.add_listener(fn)

    # -- primitives ----------------------------------------------------------

    def _drop(self, key: str, entry: Entry) -> None:
        """Forget ``key`` (holding ``entry``) everywhere; no revision, no change."""
        del self._data[key]
        size = entry_size(key, entry[VALUE])
        self._bytes -= size
        self._budget.bytes -= size
        self._budget.entries -= 1
        if entry[EXPIRE_AT] is not None:
            self._expiry.discard(key)
        self._policy.on_remove(key)

    def _insert(self, key: str, entry: Entry) -> None:
        """Hold ``entry`` for a key that is not held; no limit check, no change."""
        self._data[key] = entry
        size = entry_size(key, entry[VALUE])
        self._bytes += size
        self._budget.bytes += size
        self._budget.entries += 1
        self._policy.on_insert(key, entry[EXPIRE_AT])
        if entry[EXPIRE_AT] is not None:
            self._expiry.push(entry[EXPIRE_AT], key, entry[VERSION])
