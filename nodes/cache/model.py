"""What the cache store holds and reports: entries, changes, stats."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

Entry = tuple[bytes, int, int | None]
"""One stored value: ``(value, version, expire_at)``, read with the indexes
below. ``version`` is the revision of the write that made it; ``expire_at`` a
wall instant in nanoseconds (None: never).

A plain tuple, not a class: the garbage collector stops looking at a tuple of
bytes and ints after its first collection, while it walks every instance of a
class in each full collection. With a million keys that walk held the event
loop for 100 ms, a stall every caller of the node felt (a NamedTuple is walked
too: only exact tuples are left alone)."""

VALUE: Final = 0
VERSION: Final = 1
EXPIRE_AT: Final = 2


class ChangeType(enum.Enum):
    """What happened to a key."""

    SET = "set"
    DELETE = "delete"
    EXPIRE = "expire"
    EVICT = "evict"


@dataclass(frozen=True, slots=True)
class Change:
    """One state change. ``value`` and ``expire_at`` are set for SET only."""

    type: ChangeType
    key: str
    value: bytes
    revision: int
    expire_at: int | None
    """A wall instant in nanoseconds."""


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the store's counters; entries and bytes count live keys only."""

    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    expirations: int
    policy: str
    revision: int
