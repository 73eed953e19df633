"""A circuit breaker per node, so that a node that stopped answering is skipped at once.

CLOSED: calls go through; ``threshold`` failures in a row (the node did not
answer: connection refused or lost, or the deadline passed) open it.
OPEN: calls are refused without being sent (UNAVAILABLE, reason CIRCUIT_OPEN)
for ``cooldown`` seconds, doubled on each reopening up to ``max_cooldown``.
HALF_OPEN: after the cooldown one call goes through as a probe; its success
closes the breaker, its failure opens it again. Any answer from the node,
errors included, counts as success: the node is there.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

__all__ = ["CIRCUIT_OPEN", "CircuitBreaker", "State"]

CIRCUIT_OPEN = "CIRCUIT_OPEN"
"""Reason of the UnavailableError raised, without sending, to a node whose breaker is open."""


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """The breaker of one node."""

    def __init__(self, threshold: int = 3, cooldown: float = 0.5, max_cooldown: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._failures = 0
        self._cooldown = cooldown
        self._opened_at = 0.0
        self._state = State.CLOSED
        self._probing = False

    @property
    def state(self) -> State:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self._cooldown:
            return State.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """May a call be sent now? (In HALF_OPEN, only one probe at a time.)"""
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.OPEN or self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._cooldown = self.base_cooldown
        self._state = State.CLOSED

    def failure(self) -> None:
        self._failures += 1
        probe_failed = self._probing
        self._probing = False
        if probe_failed:
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            self._open()
        elif self._state is State.CLOSED and self._failures >= self.threshold:
            self._open()

    def abandon(self) -> None:
        """The call allowed last ended without a verdict (cancelled): allow another probe."""
        self._probing = False

    def _open(self) -> None:
        self._state = State.OPEN
        self._opened_at = self._clock()
