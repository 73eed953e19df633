"""What the cache store holds and reports: entries, changes, stats."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored value. ``version`` is the revision of the write that made it;
    ``expire_at`` a wall instant in nanoseconds (None: never)."""

    value: bytes
    version: int
    expire_at: int | None


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
