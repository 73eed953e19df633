"""The cache's operations: one in-memory key/value store with TTLs and limits.

Every write takes one path, the group's (see nodes/replication/group.py): an
operation first decides (reads the store and the injected ``clock``, once per
operation, in integer nanoseconds as are TTLs and expiry instants; checks its
conditions and room; picks expiries and eviction victims; numbers the changes
with the next revisions) and raises before anything changed if it fails; then it
proposes its changes in order (each a `Change`: SET, DELETE, EXPIRE or EVICT). A
store of its own applies them itself; a group's store hands them to the group
(``propose``), which applies them through `Holdings.apply` at once, here as on
every replica. Why: the decisions need this copy's clock, read history (LRU/LFU
order) and memory budget, which replicas do not share; applying a decided change
needs none of them, so all copies hold the same state. Reads touch the policy
order locally (not replicated); a live read proposes nothing.

Rules the whole module keeps:

* An operation that raises changes nothing (conditions and room are checked before
  the first change is proposed).
* An expired key is never returned or counted as present; it leaves the store
  (with an EXPIRE change) on the first read or write that meets it, when room is
  needed, or when `expire_due` sweeps it.
* A key's version is the revision of its last write, so versions strictly
  increase and are never reused, even after a delete.
* Memory: an entry costs ``len(key.encode()) + len(value) + ENTRY_OVERHEAD``.
  Limits cover everything held, including expired keys not yet swept; expired keys
  are reclaimed before live keys are evicted.

What the store holds, and how a change is applied to it, live in `Holdings`
(nodes/cache/holdings.py); this module is the operations and their rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from common.clock import SYSTEM_CLOCK, from_seconds, to_seconds
from nodes.cache.budget import Budget
from nodes.cache.errors import (
    CacheError,
    CacheFullError,
    IntegerOverflowError,
    KeyExistsError,
    NotAnIntegerError,
    VersionMismatchError,
)
from nodes.cache.holdings import Holdings
from nodes.cache.model import EXPIRE_AT, VALUE, VERSION, CacheStats, Change, ChangeType, Entry
from nodes.cache.room import ENTRY_OVERHEAD, entry_size, plan_room

__all__ = [
    "ENTRY_OVERHEAD",
    "CacheError",
    "CacheFullError",
    "CacheStats",
    "CacheStore",
    "Change",
    "ChangeType",
    "Entry",
    "IntegerOverflowError",
    "KeyExistsError",
    "NotAnIntegerError",
    "Propose",
    "VersionMismatchError",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_INTEGER = re.compile(rb"-?[0-9]{1,19}")


# -- helpers -----------------------------------------------------------------


def _expire_at(ttl: int | None, now: int) -> int | None:
    if ttl is None or ttl == 0:
        return None
    if not isinstance(ttl, int) or ttl < 0:
        raise ValueError(f"ttl must be a whole number of nanoseconds >= 0, got {ttl!r}")
    # As the wire carries it (float seconds): replicas mirror the very same instant.
    return from_seconds(to_seconds(now + ttl))


def _check_version(only_if_version: int) -> None:
    if only_if_version < 0:
        raise ValueError(f"only_if_version must be >= 0, got {only_if_version}")


Propose: TypeAlias = Callable[[Change], Any]
"""Makes a decided change: applies it (everywhere) and returns what `Holdings.apply`
returned (the entry a SET wrote, else None)."""

_SET = ChangeType.SET
_DELETE = ChangeType.DELETE
_EXPIRE = ChangeType.EXPIRE
_EVICT = ChangeType.EVICT


# -- the store ---------------------------------------------------------------


class CacheStore(Holdings):
    """A key/value store with TTLs, versions, memory limits and eviction.

    Not thread-safe: call it from one thread (the node's event loop).
    """

    __slots__ = ("_propose",)

    def __init__(
        self,
        *,
        max_entries: int = 0,
        max_bytes: int = 0,
        policy: str = "lru",
        clock: Callable[[], int] = SYSTEM_CLOCK.wall_ns,
        budget: Budget | None = None,
        propose: Propose | None = None,
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, policy=policy,
                         clock=clock, budget=budget)
        # How a decided change is made: by `apply` here (a store of its own), or
        # by the group (`CacheMachine`), which applies it here and on replicas.
        self._propose: Propose = self.apply if propose is None else propose

    # -- reading -------------------------------------------------------------

    @property
    def policy(self) -> str:
        """The eviction policy's name."""
        return self._policy.name

    def get(self, key: str) -> Entry | None:
        """The live entry for ``key``, or None. An expired key is removed (EXPIRE)."""
        entry = self._data.get(key)
        if entry is None:
            self._misses += 1
            return None
        expire_at = entry[EXPIRE_AT]
        if expire_at is not None and expire_at <= self._clock():
            self._misses += 1
            self._propose(Change(_EXPIRE, key, b"", self._revision + 1, None))
            self._flush()
            return None
        self._hits += 1
        self._touch(key)
        return entry

    def __len__(self) -> int:
        """Live keys held (expired keys not yet swept are not counted)."""
        return len(self._data) - sum(1 for _ in self._expiry.iter_due(self._clock()))

    def stats(self) -> CacheStats:
        """Counters and limits; entries and bytes cover live keys only."""
        due_entries = due_bytes = 0
        for key, entry in self._expiry.iter_due(self._clock()):
            due_entries += 1
            due_bytes += entry_size(key, entry[VALUE])
        return CacheStats(
            entries=len(self._data) - due_entries,
            bytes=self._bytes - due_bytes,
            max_entries=self._budget.max_entries,
            max_bytes=self._budget.max_bytes,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expirations=self._expirations,
            policy=self._policy.name,
            revision=self._revision,
        )

    # -- writing -------------------------------------------------------------

    def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl: int | None = None,
        only_if_absent: bool = False,
        only_if_version: int = 0,
    ) -> Entry:
        """Write ``key``; ttl None or 0 means no expiry. An overwrite replaces the TTL.

        Raises KeyExistsError, VersionMismatchError, CacheFullError (nothing
        changed), or ValueError for a negative ttl or version, or both conditions.
        """
        _check_version(only_if_version)
        if only_if_absent and only_if_version:
            raise ValueError("only_if_absent and only_if_version cannot be combined")
        now = self._clock()
        expire_at = _expire_at(ttl, now)
        old = self._data.get(key)
        live = old is not None and (old[EXPIRE_AT] is None or old[EXPIRE_AT] > now)
        if only_if_absent and live:
            raise KeyExistsError(key)
        if only_if_version:
            current = old[VERSION] if old is not None and live else 0
            if current != only_if_version:
                raise VersionMismatchError(key, current, only_if_version)
        entry = self._write_one(key, value, expire_at, old, now)
        self._flush()
        return entry

    def delete(self, key: str, *, only_if_version: int = 0) -> bool:
        """Remove ``key``; False if it was absent (or expired: then it is swept)."""
        _check_version(only_if_version)
        entry = self._data.get(key)
        if entry is None:
            if only_if_version:
                raise VersionMismatchError(key, 0, only_if_version)
            return False
        expire_at = entry[EXPIRE_AT]
        expired = expire_at is not None and expire_at <= self._clock()
        if only_if_version:
            current = 0 if expired else entry[VERSION]
            if current != only_if_version:
                raise VersionMismatchError(key, current, only_if_version)
        self._propose(Change(_EXPIRE if expired else _DELETE, key, b"", self._revision + 1, None))
        self._flush()
        return not expired

    def mset(self, items: Sequence[tuple[str, bytes, int | None]]) -> list[int]:
        """Write every ``(key, value, ttl)`` atomically: all of them or none.

        If a key repeats, its last item wins and is the only one written; every
        occurrence reports that write's version. Changes are emitted in the order
        of the winning items.
        """
        if not items:
            return []
        now = self._clock()
        expiries = [_expire_at(ttl, now) for _, _, ttl in items]
        last: dict[str, int] = {}
        for index, item in enumerate(items):
            last[item[0]] = index
        winners = sorted(last.values())
        data = self._data
        budget = self._budget
        plan: list[Change] = []
        if budget.max_entries or budget.max_bytes:
            sizes = {items[i][0]: entry_size(items[i][0], items[i][1]) for i in winners}
            freed_entries = freed_bytes = 0
            for key in sizes:
                old = data.get(key)
                if old is not None:
                    freed_entries += 1
                    freed_bytes += entry_size(key, old[VALUE])
            if not budget.fits(
                budget.entries - freed_entries + len(sizes),
                budget.bytes - freed_bytes + sum(sizes.values()),
            ):
                plan = self._plan_room(sizes, now)
        revision = self._revision + len(plan)
        for index in winners:
            key, value, _ = items[index]
            old = data.get(key)  # room planning never picks the batch's own keys
            if old is not None and old[EXPIRE_AT] is not None and old[EXPIRE_AT] <= now:
                revision += 1
                plan.append(Change(_EXPIRE, key, b"", revision, None))
            revision += 1
            plan.append(Change(_SET, key, value, revision, expiries[index]))
        versions: dict[str, int] = {}
        propose = self._propose
        for change in plan:
            entry = propose(change)
            if change.type is _SET:
                versions[change.key] = entry[VERSION]
        self._flush()
        return [versions[item[0]] for item in items]

    def incr(self, key: str, delta: int, *, ttl: int | None = None) -> tuple[int, int]:
        """Add ``delta`` to the decimal integer at ``key``; returns (value, version).

        A missing (or expired) key starts at 0 and gets ``ttl``; an existing key
        keeps its expiry. Raises NotAnIntegerError, IntegerOverflowError,
        CacheFullError (nothing changed), or ValueError for a bad delta or ttl.
        """
        if not INT64_MIN <= delta <= INT64_MAX:
            raise ValueError(f"delta must be a signed 64-bit integer, got {delta}")
        now = self._clock()
        expire_at = _expire_at(ttl, now)
        old = self._data.get(key)
        current = 0
        if old is not None and (old[EXPIRE_AT] is None or old[EXPIRE_AT] > now):
            raw = old[VALUE]
            if _INTEGER.fullmatch(raw) is None:
                raise NotAnIntegerError(key)
            current = int(raw)
            if not INT64_MIN <= current <= INT64_MAX:
                raise NotAnIntegerError(key)
            expire_at = old[EXPIRE_AT]
        result = current + delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise IntegerOverflowError(key, current, delta)
        entry = self._write_one(key, b"%d" % result, expire_at, old, now)
        self._flush()
        return result, entry[VERSION]

    # -- expiry --------------------------------------------------------------

    def expire_due(self, max_keys: int = 1000) -> int:
        """Remove up to ``max_keys`` expired keys (EXPIRE changes); returns how many."""
        pop_due = self._expiry.pop_due
        now = self._clock()
        removed = 0
        while removed < max_keys:
            due = pop_due(now)
            if due is None:
                break
            self._propose(Change(_EXPIRE, due[0], b"", self._revision + 1, None))
            removed += 1
        self._flush()
        return removed

    def next_expiry(self) -> int | None:
        """When the next key expires (possibly already past), or None."""
        return self._expiry.next_expiry()

    # -- internals -----------------------------------------------------------

    def _write_one(
        self, key: str, value: bytes, expire_at: int | None, old: Entry | None, now: int
    ) -> Entry:
        """Decide one write of ``key`` (which holds ``old``): room for it first
        (or raise CacheFullError, nothing changed), then propose it."""
        plan: list[Change] | None = None
        budget = self._budget
        if budget.max_entries or budget.max_bytes:
            size = entry_size(key, value)
            if old is None:
                fits = budget.fits(budget.entries + 1, budget.bytes + size)
            else:
                freed = entry_size(key, old[VALUE])
                fits = budget.fits(budget.entries, budget.bytes - freed + size)
            if not fits:
                plan = self._plan_room({key: size}, now)
        if old is not None and old[EXPIRE_AT] is not None and old[EXPIRE_AT] <= now:
            if plan is None:
                plan = []
            plan.append(Change(_EXPIRE, key, b"", self._revision + len(plan) + 1, None))
        if plan is None:  # the common case: one change, no list
            entry: Entry = self._propose(Change(_SET, key, value, self._revision + 1, expire_at))
            return entry
        plan.append(Change(_SET, key, value, self._revision + len(plan) + 1, expire_at))
        propose = self._propose
        for change in plan:
            entry = propose(change)
        return entry

    def _plan_room(self, batch: dict[str, int], now: int) -> list[Change]:
        """The removals that free enough room for ``batch`` (key -> new size), or
        CacheFullError, having changed nothing here (other stores of the node may
        have evicted for it: they are asked before this store's plan is made)."""
        budget = self._budget
        room = plan_room(batch, self._data, budget, self._expiry, self._policy, now)
        if (room.short_entries or room.short_bytes) and not budget.reclaim(
                room.short_entries, room.short_bytes, asking=self):
            raise CacheFullError(
                f"eviction policy {self._policy.name!r} cannot free room: "
                f"{room.short_entries} more entries and {room.short_bytes} more bytes "
                f"needed (max_entries={budget.max_entries}, max_bytes={budget.max_bytes})")
        plan: list[Change] = []
        revision = self._revision
        for key, _ in room.expired:
            revision += 1
            plan.append(Change(_EXPIRE, key, b"", revision, None))
        for key, _ in room.evicted:
            revision += 1
            plan.append(Change(_EVICT, key, b"", revision, None))
        return plan

    def evict(self, entries: int, nbytes: int) -> tuple[int, int]:
        """Evict by policy until ``entries`` entries and ``nbytes`` bytes are freed or
        nothing evictable is left (another store of the node needs room)."""
        victims = []
        freed_entries = freed_bytes = 0
        for key in self._policy.candidates():
            if freed_entries >= entries and freed_bytes >= nbytes:
                break
            victims.append(key)
            freed_entries += 1
            freed_bytes += entry_size(key, self._data[key][VALUE])
        propose = self._propose
        for key in victims:
            propose(Change(_EVICT, key, b"", self._revision + 1, None))
        self._flush()
        return freed_entries, freed_bytes
