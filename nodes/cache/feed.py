"""The cache store's change feed: listeners, and in-order, re-entrancy-safe delivery.

The store queues each `Change` with `ChangeFeed.publish` as it mutates, then calls
`ChangeFeed.flush` once the operation is complete, so listeners always see the
state after the whole operation, in revision order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from nodes.cache.model import Change

__all__ = ["ChangeFeed", "Listener"]

log = logging.getLogger(__name__)

Listener = Callable[[Change], None]


class ChangeFeed:
    """Registered listeners plus the changes queued for them.

    ``listeners`` is the current listeners as a tuple: falsy when there are none,
    so a publisher can skip building a `Change` nobody would see with one
    attribute read. ``publish(change)`` queues a change; it is the queue's own
    ``append`` (no Python-level call on the write path).
    """

    __slots__ = ("_delivering", "_next_id", "_pending", "_subscriptions", "listeners", "publish")

    def __init__(self) -> None:
        self._subscriptions: dict[int, Listener] = {}
        self._next_id = 0
        self._pending: deque[Change] = deque()
        self._delivering = False
        self.listeners: tuple[Listener, ...] = ()
        self.publish: Callable[[Change], None] = self._pending.append

    def add_listener(self, fn: Listener) -> Callable[[], None]:
        """Deliver every later change to ``fn``; returns a function that unsubscribes
        (calling it again does nothing)."""
        sub_id = self._next_id
        self._next_id += 1
        self._subscriptions[sub_id] = fn
        self.listeners = tuple(self._subscriptions.values())

        def unsubscribe() -> None:
            if self._subscriptions.pop(sub_id, None) is not None:
                self.listeners = tuple(self._subscriptions.values())

        return unsubscribe

    def flush(self) -> None:
        """Deliver queued changes unless a delivery is already running (re-entry).

        A listener that causes changes gets them queued behind the ones still
        pending, and this same loop delivers them, so every listener sees every
        change in order. A listener's exception is logged, never raised.
        """
        if self._delivering or not self._pending:
            return
        self._delivering = True
        pending = self._pending
        try:
            while pending:
                change = pending.popleft()
                for fn in self.listeners:
                    try:
                        fn(change)
                    except Exception:
                        log.exception("cache listener %r failed on change %d", fn, change.revision)
        finally:
            self._delivering = False
