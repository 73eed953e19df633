"""Pattern subscriptions without a network: matching, finding a group's channels
(the tenant's own only, in the covered slots), and following channels created
after the subscription began, from their first offset."""

from __future__ import annotations

import asyncio

import pytest

from common.clock import SECOND, ManualClock
from common.slots import slot_for
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_replication_pb2 as npb
from nodes.notify.feeds import SubscriptionHub, follow, step
from nodes.notify.machine import NOTIFY, NotifyMachine
from nodes.notify.model import CHANNEL, PRESENCE
from nodes.notify.patterns import PatternWatch, matches
from nodes.notify.primary import NotifyPrimary
from nodes.replication.group import Group
from tests.fakes import FakeJournal

DEFAULTS = npb.LogSettings(size=100, ttl_ns=600 * SECOND)
EVERY_SLOT = frozenset(range(16384))


def _group() -> Group:
    journal = FakeJournal()
    group = Group(1, "a", {NOTIFY: lambda g: NotifyMachine(g, journal)}, clock=ManualClock(),
                  journal=journal)
    group.become_primary(1)
    return group


def _machine(group: Group) -> NotifyMachine:
    machine = group.machines[NOTIFY]
    assert isinstance(machine, NotifyMachine)
    return machine


def _publish(group: Group, channel: str, data: bytes = b"x") -> int:
    return NotifyPrimary(group, _machine(group)).append(CHANNEL, channel, data, "", None,
                                                        DEFAULTS).offset


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("orders.*", "orders.eu", True),
    ("orders.*", "orders.eu.1", False),
    ("orders.*", "orders", False),
    ("orders.>", "orders.eu.1", True),
    ("orders.>", "orders", False),
    ("*.eu", "orders.eu", True),
    ("orders.eu", "orders.eu", True),
    ("orders.eu", "orders.us", False),
    (">", "anything.at.all", True),
])
def test_patterns_match_tokens(pattern: str, name: str, expected: bool) -> None:
    assert matches(tuple(pattern.split(".")), name) is expected


def test_a_watch_finds_matching_channels_of_its_tenant_in_its_slots() -> None:
    group = _group()
    for name in ("orders.eu", "orders.us", "orders.eu.x", "users.1", "acme\x1forders.jp"):
        _publish(group, name)
    watch = PatternWatch(_machine(group), EVERY_SLOT, [("orders", "*")], "", set(), False)
    found = watch.discover(initial=True)
    assert sorted(f.name for f, _ in found) == ["orders.eu", "orders.us"]
    # Starting from now, each with its state.
    assert all(state is not None and state.state.offset == 1 for _, state in found)
    assert watch.discover() == []  # nothing new was created
    tenant = PatternWatch(_machine(group), EVERY_SLOT, [("orders", ">")], "acme\x1f", set(),
                          False)
    assert [f.name for f, _ in tenant.discover(initial=True)] == ["orders.jp"]
    elsewhere = PatternWatch(_machine(group), frozenset({slot_for("orders.eu")}),
                             [("orders", "*")], "", {(CHANNEL, "orders.eu")}, False)
    assert elsewhere.discover(initial=True) == []  # the one in its slot is named already


async def test_channels_created_later_are_followed_from_their_first_offset() -> None:
    group = _group()
    hub = SubscriptionHub(10)
    _publish(group, "orders.old", b"before")
    watch = PatternWatch(_machine(group), EVERY_SLOT, [("orders", "*")], "", set(), False)
    initial = watch.discover(initial=True)
    sub = hub.open(frozenset({group.group_id}))
    got: list[pb.SubscribeResponse] = []

    async def consume() -> None:
        async for message in follow(sub, [f for f, _ in initial], 100, 0.0, [watch]):
            got.append(message)
            if len([m for m in got if m.HasField("publication")]) == 3:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    _publish(group, "orders.new", b"n1")
    _publish(group, "orders.new", b"n2")
    _publish(group, "orders.old", b"o2")
    _publish(group, "users.new", b"not matched")
    hub.notify(group.group_id)
    await asyncio.wait_for(task, 5)
    kinds = [(m.WhichOneof("content"), m.state.channel or m.publication.channel,
              m.state.offset if m.HasField("state") else m.publication.offset) for m in got]
    # The new channel announces its epoch (a clean start at 0), then its entries.
    assert kinds == [("publication", "orders.old", 2), ("state", "orders.new", 0),
                     ("publication", "orders.new", 1), ("publication", "orders.new", 2)] \
        or kinds == [("state", "orders.new", 0), ("publication", "orders.new", 1),
                     ("publication", "orders.new", 2), ("publication", "orders.old", 2)]
    assert got[[k[0] for k in kinds].index("state")].state.recovered
    hub.close(sub)


def test_a_resumed_watch_starts_unknown_channels_from_the_beginning() -> None:
    group = _group()
    for _ in range(3):
        _publish(group, "orders.a")
    watch = PatternWatch(_machine(group), EVERY_SLOT, [("orders", "*")], "", set(), True)
    [(feed, state)] = watch.discover(initial=True)
    assert state is None and (feed.cursor, feed.epoch) == (0, "")


def test_a_watch_with_presence_events_follows_matching_presence_logs() -> None:
    group = _group()
    primary = NotifyPrimary(group, _machine(group))
    primary.join("orders.eu", "old", "", b"", 30 * SECOND)
    watch = PatternWatch(_machine(group), EVERY_SLOT, [("orders", "*")], "", set(), False,
                         presence_events=True)
    [(existing, state)] = watch.discover(initial=True)
    assert existing.key == (PRESENCE, "orders.eu") and state is None
    assert existing.cursor == 1  # from now: the earlier join is not replayed
    primary.join("orders.us", "new", "", b"", 30 * SECOND)
    primary.join("users.1", "other", "", b"", 30 * SECOND)
    [(found, _)] = watch.discover()
    assert found.key == (PRESENCE, "orders.us") and found.cursor == 0  # new: all of it
    messages, _ = step(found, 100)
    assert [m.presence_event.member.client_id for m in messages] == ["new"]
