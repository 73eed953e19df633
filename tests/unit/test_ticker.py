"""The node's one loop for periodic work: who is ticked, on which groups, and when."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from common.clock import MILLISECOND, SECOND, ManualClock
from nodes.replication.manager import Replication
from nodes.ticker import MIN_DELAY, Ticker


class Group:
    def __init__(self, group_id: int, writable: bool) -> None:
        self.group_id = group_id
        self.writable = writable


class Service:
    """Records its ticks; answers with ``wants`` (an instant) or None."""

    def __init__(self, name: str, interval: int, wants: int | None = None,
                 fails_on: int | None = None) -> None:
        self.name = name
        self.tick_interval_ns = interval
        self.wants = wants
        self.fails_on = fails_on
        self.ticks: list[tuple[int, int]] = []

    def tick(self, group: Group, now_ns: int) -> int | None:
        self.ticks.append((group.group_id, now_ns))
        if group.group_id == self.fails_on:
            raise RuntimeError("boom")
        return self.wants


class Groups:
    def __init__(self, *groups: Group) -> None:
        self.groups = {g.group_id: g for g in groups}


def _ticker(services: list[Service], *groups: Group, clock: ManualClock | None = None
            ) -> Ticker:
    return Ticker(cast(Any, services), cast(Replication, Groups(*groups)),
                  clock or ManualClock())


def test_due_services_tick_every_writable_group_and_the_soonest_sets_the_next() -> None:
    fast, slow = Service("fast", SECOND), Service("slow", 10 * SECOND)
    ticker = _ticker([fast, slow], Group(1, True), Group(2, False), Group(3, True))
    assert ticker.tick(100) == 100 + SECOND
    assert fast.ticks == [(1, 100), (3, 100)] and slow.ticks == [(1, 100), (3, 100)]
    assert ticker.tick(100 + SECOND) == 100 + 2 * SECOND  # only the fast one was due
    assert len(fast.ticks) == 4 and len(slow.ticks) == 2


def test_a_tick_may_ask_to_come_back_sooner_and_a_service_without_interval_never_ticks() -> None:
    soon = 100 + 10 * MIN_DELAY
    eager, idle = Service("eager", SECOND, wants=soon), Service("idle", 0)
    ticker = _ticker([eager, idle], Group(1, True))
    assert ticker.tick(100) == soon
    assert idle.ticks == []


def test_busy_means_at_once_and_a_past_instant_still_waits_a_little() -> None:
    busy, late = Service("busy", SECOND, wants=100), Service("late", SECOND, wants=50)
    assert _ticker([busy], Group(1, True)).tick(100) == 100
    assert _ticker([late], Group(1, True)).tick(100) == 100 + MIN_DELAY


def test_a_failing_tick_is_logged_and_the_other_groups_still_tick() -> None:
    flaky = Service("flaky", SECOND, fails_on=1)
    ticker = _ticker([flaky], Group(1, True), Group(2, True))
    assert ticker.tick(0) == SECOND
    assert flaky.ticks == [(1, 0), (2, 0)]


async def test_the_loop_sleeps_until_the_next_due_tick_on_the_clock() -> None:
    clock = ManualClock(wall_ns=0)
    service = Service("s", SECOND, wants=None)
    ticker = _ticker([service], Group(1, True), clock=clock)
    ticker.start()
    await asyncio.sleep(0)
    assert len(service.ticks) == 1
    clock.advance(SECOND - MILLISECOND)
    await asyncio.sleep(0)
    assert len(service.ticks) == 1  # not due yet
    clock.advance(MILLISECOND)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [at for _, at in service.ticks] == [0, SECOND]
    await ticker.close()
