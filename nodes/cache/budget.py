"""Memory limits shared by all the cache stores of one node.

A node holds one store per replica group it serves (as primary or replica), but
its limits (``--cache-max-entries``, ``--cache-max-bytes``) are for the node as a
whole: every store counts what it holds into the node's one `Budget`, and checks
the node's totals before a write. A primary that needs room evicts from the store
being written (its group's own LRU/LFU order): per-group eviction approximates a
node-wide order the way Redis's sampled LRU does, and keeps every eviction a
change of one group, replicated like any other write. Replicas never evict on
their own: they mirror their primary, which counts the same data.
"""

from __future__ import annotations

__all__ = ["Budget"]


class Budget:
    """Limits (0 = none) and what every store of the node holds right now."""

    __slots__ = ("bytes", "entries", "max_bytes", "max_entries")

    def __init__(self, max_entries: int = 0, max_bytes: int = 0) -> None:
        for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries = 0
        self.bytes = 0

    @property
    def limited(self) -> bool:
        return bool(self.max_entries or self.max_bytes)

    def fits(self, entries: int, nbytes: int) -> bool:
        """Whether the node may hold ``entries`` entries of ``nbytes`` bytes."""
        return (not self.max_entries or entries <= self.max_entries) and (
            not self.max_bytes or nbytes <= self.max_bytes
        )
