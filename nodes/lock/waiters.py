"""Acquire calls waiting for a lock, on the primary, in arrival order.

Waiters are not replicated: each is an open call on the primary, and a failover
ends it (UNAVAILABLE), so the client retries at the new primary with the rest of
its wait. That keeps the replicated state small and the queue exactly as fair
as the calls that are really still waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

from nodes.lock.table import Lease

__all__ = ["Grant", "WaitQueue", "Waiter"]


@dataclass(frozen=True, slots=True)
class Grant:
    """A lease granted to a waiter, and the command (seq) that must commit first."""

    lease: Lease
    seq: int


@dataclass(eq=False, slots=True)
class Waiter:
    """One queued Acquire (times in nanoseconds, instants on the wall clock)."""

    owner: str
    permits: int
    ttl_ns: int
    request_id: str
    since_ns: int
    give_up_ns: int
    shared: bool = False
    future: asyncio.Future[Grant] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class WaitQueue:
    """The FIFO of one lock name. Strict order: the head is served first even if a
    later waiter wants fewer permits, so a large request is never starved."""

    def __init__(self, max_permits: int) -> None:
        self.max_permits = max_permits
        self._waiters: dict[Waiter, None] = {}  # insertion-ordered, O(1) removal

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._waiters)

    def push(self, waiter: Waiter) -> None:
        self._waiters[waiter] = None

    def head(self) -> Waiter | None:
        return next(iter(self._waiters), None)

    def remove(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out of the queue; False if it was not in it."""
        if waiter not in self._waiters:
            return False
        del self._waiters[waiter]
        return True

    def by_request(self, request_id: str) -> Waiter | None:
        for waiter in self._waiters:
            if waiter.request_id == request_id:
                return waiter
        return None

    def replace(self, old: Waiter, new: Waiter) -> None:
        """``new`` takes ``old``'s place (a retried Acquire keeps its turn)."""
        self._waiters = {(new if w is old else w): None for w in self._waiters}
