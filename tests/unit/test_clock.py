"""The clock seam: `ManualClock` moves only when told, and runs timers and sleepers
in order, each at its own instant; the unit conversions are exact enough."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest

from common import event_loop
from common.clock import (
    MILLISECOND,
    SECOND,
    SYSTEM_CLOCK,
    ManualClock,
    from_seconds,
    to_seconds,
)


def test_timers_run_in_order_each_at_its_instant() -> None:
    clock = ManualClock(wall_ns=1000 * SECOND, monotonic_ns=5)
    seen: list[tuple[str, int]] = []
    clock.call_at(clock.wall_ns() + 3 * SECOND, lambda: seen.append(("c", clock.wall_ns())))
    clock.call_at(clock.wall_ns() + 1 * SECOND, lambda: seen.append(("a", clock.wall_ns())))
    dropped = clock.call_at(clock.wall_ns() + 2 * SECOND, lambda: seen.append(("x", 0)))
    dropped.cancel()

    def chained() -> None:  # a timer set by a timer runs in the same advance if due
        seen.append(("b", clock.wall_ns()))
        clock.call_at(clock.wall_ns() + 500 * MILLISECOND,
                      lambda: seen.append(("b2", clock.wall_ns())))

    clock.call_at(clock.wall_ns() + 2 * SECOND, chained)
    assert clock.pending == 3
    clock.advance(2500 * MILLISECOND)
    start = 1000 * SECOND
    assert seen == [("a", start + SECOND), ("b", start + 2 * SECOND),
                    ("b2", start + 2500 * MILLISECOND)]
    assert clock.wall_ns() == start + 2500 * MILLISECOND
    assert clock.monotonic_ns() == 5 + 2500 * MILLISECOND  # both move together
    assert clock.next_due() == start + 3 * SECOND
    clock.advance(SECOND)
    assert seen[-1] == ("c", start + 3 * SECOND) and clock.pending == 0
    with pytest.raises(ValueError):
        clock.set(start)


def test_a_wall_clock_jump_moves_no_timer() -> None:
    """Timers wait on elapsed time, as asyncio's do: stepping the wall clock either
    way runs none early and holds none back, and `call_at` reads the wall clock
    only when it is called."""
    clock = ManualClock(wall_ns=1000 * SECOND, monotonic_ns=0)
    seen: list[str] = []
    clock.call_after(2 * SECOND, lambda: seen.append("after"))
    clock.call_at(1003 * SECOND, lambda: seen.append("at"))
    clock.jump(3600 * SECOND)
    assert clock.wall_ns() == 4600 * SECOND and clock.monotonic_ns() == 0
    assert clock.next_due() == 4602 * SECOND
    clock.advance(SECOND)
    assert seen == []
    clock.jump(-7200 * SECOND)
    clock.advance(SECOND)
    assert seen == ["after"]
    clock.advance(SECOND)
    assert seen == ["after", "at"] and clock.monotonic_ns() == 3 * SECOND


async def test_sleep_ends_when_the_test_advances_the_clock() -> None:
    clock = ManualClock()
    woke: list[int] = []

    async def sleeper(ns: int) -> None:
        await clock.sleep(ns)
        woke.append(ns)

    tasks = [asyncio.create_task(sleeper(ns)) for ns in (30 * SECOND, 10 * SECOND)]
    await asyncio.sleep(0)
    assert clock.pending == 2
    await clock.settle(10 * SECOND)
    assert woke == [10 * SECOND]
    await clock.settle(20 * SECOND)
    assert woke == [10 * SECOND, 30 * SECOND]
    await asyncio.gather(*tasks)

    cancelled = asyncio.create_task(clock.sleep(SECOND))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert clock.pending == 0  # a cancelled sleep leaves no timer behind


async def test_the_system_clock_sleeps_and_calls_back() -> None:
    fired = asyncio.Event()
    SYSTEM_CLOCK.call_at(SYSTEM_CLOCK.wall_ns() + MILLISECOND, fired.set)
    await asyncio.wait_for(fired.wait(), 2)
    before = SYSTEM_CLOCK.monotonic_ns()
    await SYSTEM_CLOCK.sleep(MILLISECOND)
    assert SYSTEM_CLOCK.monotonic_ns() - before >= MILLISECOND


def test_seconds_round_trip() -> None:
    for seconds in (0.0, 0.05, 9.999, 30.0, 1_700_000_000.123456, 1_764_000_000.987654321):
        assert to_seconds(from_seconds(seconds)) == seconds
    assert from_seconds(9.999) == 9_999 * MILLISECOND
    assert from_seconds(-1.5) == -1500 * MILLISECOND


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_system_timers_never_fire_early_on_either_loop(loop: str) -> None:
    """uvloop's own timers count whole milliseconds from a cached time and fire up
    to about a millisecond early; the clock's timers wait out what is left."""

    async def fired_early() -> tuple[int, int]:
        early = cancelled_ran = 0
        done = asyncio.get_running_loop().create_future()
        pending = 0

        def fire(target: int) -> None:
            nonlocal early, pending
            early += time.monotonic_ns() < target
            pending -= 1
            if pending == 0:
                done.set_result(None)

        def ran_anyway() -> None:
            nonlocal cancelled_ran
            cancelled_ran += 1

        for i in range(300):
            delay = (i % 30) * MILLISECOND // 10  # 0 to 2.9 ms
            pending += 1
            SYSTEM_CLOCK.call_after(delay, functools.partial(fire, time.monotonic_ns() + delay))
            SYSTEM_CLOCK.call_after(delay, ran_anyway).cancel()
            if i % 10 == 0:
                await asyncio.sleep(0)  # timers set from different loop iterations
        await done
        await asyncio.sleep(0.01)
        return early, cancelled_ran

    assert event_loop.run(fired_early(), loop) == (0, 0)
