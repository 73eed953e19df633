"""The saga driver's wake-ups, with fakes for the groups (no node, no I/O)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from mesh.saga.v1 import saga_pb2 as pb
from mesh.saga.v1 import saga_replication_pb2 as spb
from nodes.config import SagaLimits
from nodes.internal_client import InternalClient
from nodes.replication.group import Group
from nodes.saga import driver as driver_module
from nodes.saga.driver import Driver
from nodes.saga.machine import SagaMachine


class _Group:
    def __init__(self, group_id: int) -> None:
        self.group_id = group_id
        self.writable = True


class _Machine:
    def __init__(self, group: _Group) -> None:
        self.group = group
        self.active: set[str] = set()
        self.unpublished: set[str] = set()


async def test_a_changed_saga_is_examined_in_its_own_group_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A change wakes the driver for that saga only, found through its group's id:
    a node leads hundreds of groups, and listing them all on every change of every
    saga cost sagas about an eighth of their rate."""
    # One periodic pass (the first), then only wake-ups by changes.
    monkeypatch.setattr(driver_module, "SCAN_SECONDS", 3600.0)
    groups = {gid: _Group(gid) for gid in range(1, 6)}
    machines = {gid: _Machine(g) for gid, g in groups.items()}
    machines[1].active.add("s-1")
    asked: list[int] = []
    examined: list[tuple[Any, str, bool]] = []
    seen = asyncio.Event()

    def led_in(group_id: int) -> SagaMachine | None:
        asked.append(group_id)
        return cast(SagaMachine, machines.get(group_id))

    driver = Driver(SagaLimits())

    def examine(machine: Any, saga_id: str, now: int, *, publish: bool) -> None:
        examined.append((machine, saga_id, publish))
        seen.set()

    driver._examine = examine  # type: ignore[method-assign]
    driver.start(cast(InternalClient, object()), led_in)
    try:
        # The first pass after a wake-up is a periodic one: it walks the groups
        # whose sagas changed, here the one.
        driver.changed(cast(Group, groups[1]), "s-1")
        await asyncio.wait_for(seen.wait(), 5)
        assert asked == [1] and examined == [(machines[1], "s-1", True)]
        seen.clear()
        asked.clear()
        driver.changed(cast(Group, groups[3]), "s-3")
        await asyncio.wait_for(seen.wait(), 5)
        assert asked == [3]
        assert examined[-1] == (machines[3], "s-3", False)
        # A group no longer led here (led_in says None) is skipped.
        seen.clear()
        driver.changed(cast(Group, _Group(9)), "s-9")
        driver.changed(cast(Group, groups[4]), "s-4")
        await asyncio.wait_for(seen.wait(), 5)
        assert 9 in asked and examined[-1] == (machines[4], "s-4", False)
    finally:
        await driver.close()


async def test_the_periodic_pass_walks_only_the_groups_with_sagas_in_flight(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Timeouts, due checks and history are looked for in the groups whose sagas
    changed while led here, until they have nothing in flight: an idle node that
    leads thousands of groups walks none of them."""
    monkeypatch.setattr(driver_module, "SCAN_SECONDS", 0.01)  # every pass a periodic one
    groups = {gid: _Group(gid) for gid in range(1, 6)}
    machines = {gid: _Machine(g) for gid, g in groups.items()}
    machines[2].active.add("a")
    machines[4].unpublished.add("b")
    asked: list[int] = []
    examined: list[tuple[Any, str, bool]] = []

    def led_in(group_id: int) -> SagaMachine | None:
        asked.append(group_id)
        return cast(SagaMachine, machines.get(group_id))

    async def passes(n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0.015)

    driver = Driver(SagaLimits())
    driver._examine = lambda machine, saga_id, now, *, publish: examined.append(  # type: ignore[method-assign]
        (machine, saga_id, publish))
    driver.start(cast(InternalClient, object()), led_in)
    try:
        await passes(3)
        assert asked == [] and examined == []  # nothing changed: nothing walked
        driver.changed(cast(Group, groups[2]), "a")
        driver.changed(cast(Group, groups[4]), "b")
        await passes(5)
        assert set(asked) == {2, 4}
        assert (machines[2], "a", True) in examined and (machines[4], "b", True) in examined
        # Its sagas ended and are published: the group drops out of the walk.
        machines[2].active.clear()
        await passes(3)
        asked.clear()
        await passes(5)
        assert set(asked) == {4}
        # A group that is no longer led here leaves it at once.
        driver.forget_group(cast(Group, groups[4]))
        asked.clear()
        await passes(5)
        assert asked == []
    finally:
        await driver.close()


def _record(saga_id: str, entry_times_ns: list[int], state: int) -> spb.SagaRecord:
    record = spb.SagaRecord()
    record.saga.saga_id = saga_id
    record.saga.state = state  # type: ignore[assignment]
    for i, t in enumerate(entry_times_ns):
        entry = record.saga.history.add(index=i + 1, kind="step_dispatched")
        entry.time.FromNanoseconds(t)
    return record


def test_a_running_saga_appends_its_history_once_it_waited_and_an_ended_one_at_once(
) -> None:
    """The periodic pass appends a running saga's history only once its oldest
    unpublished entry is `PUBLISH_AFTER_NS` old: a saga that ends sooner appends it
    in one call, when it ends, instead of a call per pass and one at the end."""
    now = 100 * driver_module.PUBLISH_AFTER_NS
    young = now - driver_module.PUBLISH_AFTER_NS // 2
    old = now - driver_module.PUBLISH_AFTER_NS
    group = _Group(1)
    machine = _Machine(group)
    machine.sagas = {  # type: ignore[attr-defined]
        "young": _record("young", [old, young], pb.SAGA_STATE_RUNNING),
        "old": _record("old", [old, young], pb.SAGA_STATE_RUNNING),
        "ended": _record("ended", [young, young], pb.SAGA_STATE_COMPLETED),
        "done": _record("done", [old], pb.SAGA_STATE_COMPLETED),
    }
    machine.sagas["young"].published = 1  # type: ignore[attr-defined]
    machine.sagas["done"].published = 1  # type: ignore[attr-defined]
    driver = Driver(SagaLimits())
    spawned: list[tuple[str, str]] = []

    def spawn(gid: int, saga_id: str, what: str, now: int, work: Any) -> None:
        spawned.append((saga_id, what))

    driver._spawn = spawn  # type: ignore[method-assign]

    def examine(saga_id: str, publish: bool) -> list[str]:
        spawned.clear()
        driver._examine(cast(SagaMachine, machine), saga_id, now, publish=publish)
        return [what for _, what in spawned]

    assert examine("young", publish=True) == []  # its unpublished entry is young
    assert examine("old", publish=True) == ["publish"]
    assert examine("old", publish=False) == []  # a wake-up by a change: not yet
    assert examine("ended", publish=False) == ["publish"]  # ended: at once
    assert examine("done", publish=True) == []  # nothing left to append
