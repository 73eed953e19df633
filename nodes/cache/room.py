"""Planning room in a full cache store: which keys expire and which are evicted.

Planning is kept apart from doing: `plan_room` only reads, so a write that
cannot fit raises `CacheFullError` having changed nothing, and the store then
carries out a plan already known to meet both limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from nodes.cache.budget import Budget
from nodes.cache.errors import CacheFullError
from nodes.cache.eviction import EvictionPolicy
from nodes.cache.expiry import ExpiryIndex
from nodes.cache.model import VALUE, Entry

__all__ = ["ENTRY_OVERHEAD", "Plan", "entry_size", "plan_room"]

ENTRY_OVERHEAD = 64
"""Bytes accounted to every entry on top of its key and value."""

Removals = list[tuple[str, Entry]]


class Plan(NamedTuple):
    """What to remove from one store, and what the node still lacks after that."""

    expired: Removals
    evicted: Removals
    short_entries: int
    short_bytes: int


def entry_size(key: str, value: bytes) -> int:
    """What an entry costs against the byte limit."""
    # isascii() is O(1) on CPython's compact strings: no encode for ASCII keys.
    return (len(key) if key.isascii() else len(key.encode())) + len(value) + ENTRY_OVERHEAD


def plan_room(
    batch: Mapping[str, int],
    data: Mapping[str, Entry],
    budget: Budget,
    expiry: ExpiryIndex,
    policy: EvictionPolicy,
    now: int,
) -> Plan:
    """Plan room for ``batch`` (key -> new size) in one store.

    The batch's own keys free their old size and are never victims; expired keys
    go first (all of them that are due), then the policy's candidates in order,
    until the node's budget can hold the batch. Victims come from ``data`` only
    (one store): when it cannot free enough, the plan says how much is still
    missing. Raises CacheFullError only when the batch alone exceeds a limit.
    """
    max_entries, max_bytes = budget.max_entries, budget.max_bytes
    new_entries = len(batch)
    new_bytes = sum(batch.values())
    if max_entries and new_entries > max_entries:
        raise CacheFullError(f"{new_entries} keys cannot fit in max_entries={max_entries}")
    if max_bytes and new_bytes > max_bytes:
        raise CacheFullError(f"{new_bytes} bytes cannot fit in max_bytes={max_bytes}")
    # What the node holds besides the batch's keys, and how much of it must go.
    entries = budget.entries
    nbytes = budget.bytes
    for key in batch:
        old = data.get(key)
        if old is not None:
            entries -= 1
            nbytes -= entry_size(key, old[VALUE])
    excess_entries = entries + new_entries - max_entries if max_entries else 0
    excess_bytes = nbytes + new_bytes - max_bytes if max_bytes else 0

    expired: Removals = []
    soonest = expiry.next_expiry()
    if soonest is not None and soonest <= now:
        for key, entry in expiry.iter_due(now):
            if key not in batch:
                expired.append((key, entry))
                excess_entries -= 1
                excess_bytes -= entry_size(key, entry[VALUE])

    victims: Removals = []
    if excess_entries > 0 or excess_bytes > 0:
        skip = {key for key, _ in expired}
        for key in policy.candidates():
            if key in batch or key in skip:
                continue
            entry = data[key]
            victims.append((key, entry))
            excess_entries -= 1
            excess_bytes -= entry_size(key, entry[VALUE])
            if excess_entries <= 0 and excess_bytes <= 0:
                break
    return Plan(expired, victims, max(excess_entries, 0), max(excess_bytes, 0))
