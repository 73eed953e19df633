"""Time as a dependency: the one clock a node's state code reads.

Inside the state code (machines, tables, stores, decisions, timers) instants
and durations are integer nanoseconds: wall instants from `Clock.wall_ns`
(`time.time_ns`), elapsed time from `Clock.monotonic_ns`. Float seconds and
protobuf Timestamps/Durations exist only at the edges, converted with
`to_seconds` and `from_seconds`.

`SystemClock` is the real one. `ManualClock` is for tests: time moves only when
the test calls `ManualClock.advance`, which runs the timers (`call_at`,
`call_after`) and wakes the sleepers (`sleep`) that come due, in order, each at
its own instant, so a test of a 30-second lease takes no real time at all.
`ManualClock.jump` steps the wall clock alone, as NTP or an operator may.

Timers wait on elapsed time, as asyncio's do: `call_at` turns its wall instant
into a delay when it is called, so a wall clock that steps afterwards moves no
timer. Code whose correctness must survive such a step (a lock's expiry)
measures with `monotonic_ns` and `call_after`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["MILLISECOND", "SECOND", "SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock",
           "Timer", "from_seconds", "to_seconds"]

SECOND = 1_000_000_000
MILLISECOND = 1_000_000


def to_seconds(ns: int) -> float:
    """``ns`` nanoseconds as float seconds (for the wire and for asyncio)."""
    return ns / SECOND


def from_seconds(seconds: float) -> int:
    """Float seconds as integer nanoseconds; exact enough that
    ``to_seconds(from_seconds(s)) == s`` for any wall instant or duration."""
    whole = int(seconds)
    # The fraction of a double is exact: only its scaling rounds (well below 1 ns).
    return whole * SECOND + round((seconds - whole) * SECOND)


class Timer(Protocol):
    """A pending `Clock.call_at` callback."""

    def cancel(self) -> None:
        """Do not run it (nothing happens if it ran already)."""
        ...


class Clock(Protocol):
    """Where the node's state code gets the time from."""

    def wall_ns(self) -> int:
        """Now, in nanoseconds since the epoch (an instant other nodes understand)."""
        ...

    def monotonic_ns(self) -> int:
        """A point on a clock that never goes back (for elapsed time only)."""
        ...

    def call_at(self, wall_ns: int, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` once `wall_ns` reaches ``wall_ns`` (on the event loop)."""
        ...

    def call_after(self, ns: int, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` once ``ns`` nanoseconds have passed (on the event loop)."""
        ...

    async def sleep(self, ns: int) -> None:
        """Wait ``ns`` nanoseconds of this clock's time."""
        ...


class SystemClock:
    """The machine's clocks; timers and sleeps on the running event loop."""

    def wall_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def call_at(self, wall_ns: int, callback: Callable[[], object]) -> Timer:
        return self.call_after(wall_ns - time.time_ns(), callback)

    def call_after(self, ns: int, callback: Callable[[], object]) -> Timer:
        return _LoopTimer(time.monotonic_ns() + max(ns, 0), callback)

    async def sleep(self, ns: int) -> None:
        await asyncio.sleep(to_seconds(max(ns, 0)))


class _LoopTimer:
    """A timer on the running loop that never runs its callback before its
    monotonic instant.

    uvloop's timers count whole milliseconds from the time its loop cached at the
    start of the iteration, so one may fire up to about a millisecond early; a
    scheduler's "never before its run time" must not depend on the loop. An
    early one sets itself again for what is left, rounded up to a millisecond
    (less would make uvloop wake at once, round after round).
    """

    __slots__ = ("_at", "_callback", "_handle")

    def __init__(self, at_mono_ns: int, callback: Callable[[], object]) -> None:
        self._at = at_mono_ns
        self._callback = callback
        left = max(at_mono_ns - time.monotonic_ns(), 0)
        self._handle = asyncio.get_running_loop().call_later(to_seconds(left), self._fire)

    def _fire(self) -> None:
        left = self._at - time.monotonic_ns()
        if left > 0:
            whole_ms = -(-left // MILLISECOND) * MILLISECOND
            self._handle = asyncio.get_running_loop().call_later(to_seconds(whole_ms),
                                                                 self._fire)
            return
        self._callback()

    def cancel(self) -> None:
        self._handle.cancel()


SYSTEM_CLOCK: Clock = SystemClock()
"""The default everywhere a clock is a constructor argument."""


class _ManualTimer:
    __slots__ = ("at", "callback", "cancelled")

    def __init__(self, at: int, callback: Callable[[], object]) -> None:
        self.at = at
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that stands still until the test moves it.

    ``advance`` runs every timer due on the way, in order of due time, with the
    clock set to that timer's instant while it runs (a timer set meanwhile runs
    too if it is due before the end), then leaves the clock at the end. Sleepers
    are timers that resolve a future: their coroutines resume when the event
    loop next runs (``await asyncio.sleep(0)`` in the test, or `settle`).
    Timers are kept on the monotonic clock, so `jump` moves none of them.
    """

    def __init__(self, wall_ns: int = 1_700_000_000 * SECOND, monotonic_ns: int = 0) -> None:
        self._mono = monotonic_ns
        self._offset = wall_ns - monotonic_ns  # wall = monotonic + offset, until a jump
        self._timers: list[tuple[int, int, _ManualTimer]] = []  # by monotonic due time
        self._order = itertools.count()

    def wall_ns(self) -> int:
        return self._mono + self._offset

    def monotonic_ns(self) -> int:
        return self._mono

    def call_at(self, wall_ns: int, callback: Callable[[], object]) -> Timer:
        return self.call_after(wall_ns - self.wall_ns(), callback)

    def call_after(self, ns: int, callback: Callable[[], object]) -> Timer:
        at = self._mono + max(ns, 0)
        timer = _ManualTimer(at, callback)
        heapq.heappush(self._timers, (at, next(self._order), timer))
        return timer

    async def sleep(self, ns: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_after(ns, wake)
        try:
            await future
        finally:
            timer.cancel()

    @property
    def pending(self) -> int:
        """Timers and sleepers not yet due (nor cancelled)."""
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    def next_due(self) -> int | None:
        """The wall instant of the next pending timer, or None."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] + self._offset if self._timers else None

    def set(self, wall_ns: int) -> None:
        """Move to ``wall_ns`` (not backwards), running what comes due."""
        if wall_ns < self.wall_ns():
            raise ValueError("a clock does not go back")
        end = wall_ns - self._offset
        while self._timers and self._timers[0][0] <= end:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._mono = max(self._mono, timer.at)
            timer.callback()
        self._mono = end

    def advance(self, ns: int) -> None:
        """Let ``ns`` nanoseconds pass, running what comes due."""
        self.set(self.wall_ns() + ns)

    def jump(self, ns: int) -> None:
        """Step the wall clock by ``ns`` (either way) with no time passing: what
        NTP or an operator setting the date does. No timer runs or moves."""
        self._offset += ns

    async def settle(self, ns: int = 0) -> None:
        """`advance` by ``ns``, then let the woken coroutines run until they wait again."""
        self.advance(ns)
        for _ in range(10):  # a few turns: a woken task may wake another
            await asyncio.sleep(0)
