"""Memory limits shared by all the cache stores of one node.

A node holds one store per replica group it serves (as primary or replica), but
its limits (``--cache-max-entries``, ``--cache-max-bytes``) are for the node as a
whole: every store counts what it holds into the node's one `Budget`, and checks
the node's totals before a write. A primary that needs room evicts from the store
being written first (its group's own LRU/LFU order), then from the other groups
the node leads (``donors``). Eviction order is thus per group, an approximation
of a node-wide order in the spirit of Redis's sampled LRU, and every eviction is
a change of one group, replicated like any other write. Replicas never evict on
their own: they mirror their primary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

__all__ = ["Budget", "Donor"]


class Donor(Protocol):
    """A store that can give room back by evicting (one the node leads)."""

    def evict(self, entries: int, nbytes: int) -> tuple[int, int]:
        """Evict by policy until ``entries`` entries and ``nbytes`` bytes are freed
        (or nothing evictable is left); returns what was freed."""


class Budget:
    """Limits (0 = none) and what every store of the node holds right now."""

    __slots__ = ("bytes", "donors", "entries", "max_bytes", "max_entries")

    def __init__(self, max_entries: int = 0, max_bytes: int = 0) -> None:
        for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries = 0
        self.bytes = 0
        self.donors: Callable[[], Iterable[Donor]] = tuple

    def reclaim(self, entries: int, nbytes: int, asking: object) -> bool:
        """Evict from donors other than ``asking``; True once enough is free."""
        for donor in self.donors():
            if donor is asking:
                continue
            freed_entries, freed_bytes = donor.evict(entries, nbytes)
            entries -= freed_entries
            nbytes -= freed_bytes
            if entries <= 0 and nbytes <= 0:
                return True
        return entries <= 0 and nbytes <= 0

    @property
    def limited(self) -> bool:
        return bool(self.max_entries or self.max_bytes)

    def fits(self, entries: int, nbytes: int) -> bool:
        """Whether the node may hold ``entries`` entries of ``nbytes`` bytes."""
        return (not self.max_entries or entries <= self.max_entries) and (
            not self.max_bytes or nbytes <= self.max_bytes
        )
