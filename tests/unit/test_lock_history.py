"""The lock history checker finds what it must (and nothing else)."""

from __future__ import annotations

from tests.lock_history import Op, check, holds


def _hold(client: str, token: int, start: float, end: float) -> list[Op]:
    return [Op(client, "acquire", start - 0.01, start, token),
            Op(client, "release", end, end + 0.01)]


def test_a_clean_history_passes() -> None:
    history = _hold("a", 5, 1.0, 2.0) + _hold("b", 7, 2.05, 3.0) + _hold("a", 9, 3.1, 4.0)
    assert check(history) == []
    assert [h.client for h in holds(history)] == ["a", "b", "a"]


def test_overlapping_holders_are_reported() -> None:
    problems = check(_hold("a", 5, 1.0, 2.0) + _hold("b", 7, 1.5, 3.0))
    assert len(problems) == 1 and "while a" in problems[0]


def test_a_token_that_does_not_grow_is_reported() -> None:
    problems = check(_hold("a", 7, 1.0, 2.0) + _hold("b", 7, 2.5, 3.0))
    assert problems == ["token 7 of b granted after token 7 of a"]


def test_a_hold_never_released_lasts_forever() -> None:
    history = [Op("a", "acquire", 0.9, 1.0, 3), *_hold("b", 4, 5.0, 6.0)]
    assert len(check(history)) == 1


def test_a_lost_lease_ends_the_hold_and_failed_acquires_do_not_count() -> None:
    history = [Op("a", "acquire", 0.9, 1.0, 3), Op("a", "lost", 2.0, 2.0),
               Op("c", "acquire", 1.1, 1.5, 0, ok=False), *_hold("b", 4, 2.5, 3.0)]
    assert check(history) == []


def test_ops_round_trip_through_json() -> None:
    op = Op("w1", "acquire", 1.5, 2.5, 42)
    assert Op.from_json(op.to_json()) == op
