"""The per-node circuit breaker's states, on an injected clock."""

from __future__ import annotations

from clients.breaker import CircuitBreaker, State


def state(breaker: CircuitBreaker) -> State:
    """The state now (a call, so that type checkers do not carry over an earlier value)."""
    return breaker.state


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_failures_in_a_row() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=Clock())
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # an answer resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert state(breaker) is State.OPEN and not breaker.allow()


def test_half_open_lets_one_probe_through_and_its_answer_decides() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, max_cooldown=3.0, clock=clock)
    breaker.failure()
    assert not breaker.allow()
    clock.now += 1.0
    assert state(breaker) is State.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open again, for twice as long
    clock.now += 1.5
    assert state(breaker) is State.OPEN
    clock.now += 0.5
    assert breaker.allow()
    breaker.failure()
    clock.now += 3.0  # capped at max_cooldown
    assert breaker.allow()
    breaker.success()
    assert state(breaker) is State.CLOSED and breaker.allow() and breaker.allow()
    breaker.failure()  # the cooldown went back to its base
    clock.now += 1.0
    assert state(breaker) is State.HALF_OPEN


def test_an_abandoned_probe_frees_the_half_open_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.abandon()  # cancelled before an answer
    assert breaker.allow()
