"""A replica's store mirrors its primary's changes; a node's stores share one budget."""

from __future__ import annotations

import pytest

from common.clock import SECOND, ManualClock
from nodes.cache.budget import Budget
from nodes.cache.model import VERSION
from nodes.cache.store import CacheFullError, CacheStore, Change


class NoClock:
    """A replica's clock while it mirrors: reading it is a bug."""

    mirroring = True

    def __call__(self) -> int:
        if self.mirroring:
            pytest.fail("a replica must not read its clock while mirroring")
        return 1000 * SECOND


def mirrored(primary: CacheStore) -> tuple[CacheStore, list[Change], NoClock]:
    clock = NoClock()
    replica = CacheStore(clock=clock)
    changes: list[Change] = []
    primary.add_listener(changes.append)
    return replica, changes, clock


def test_replica_holds_exactly_what_the_primary_holds() -> None:
    clock = ManualClock(wall_ns=1000 * SECOND)
    primary = CacheStore(clock=clock.wall_ns, max_entries=3)
    replica, changes, replica_clock = mirrored(primary)
    primary.set("a", b"1")
    primary.set("b", b"2", ttl=5 * SECOND)
    primary.incr("n", 7)
    primary.delete("a")
    primary.set("c", b"3", ttl=5 * SECOND)
    primary.set("d", b"4")  # evicts b, the least recently used key
    clock.advance(10 * SECOND)
    primary.expire_due()  # c expires
    for change in changes:
        replica.mirror(change)
    replica_clock.mirroring = False
    assert replica.export() == primary.export()
    assert replica.revision == primary.revision
    assert replica.stats().evictions == primary.stats().evictions == 1
    assert replica.stats().expirations == primary.stats().expirations == 1


def test_versions_keep_growing_after_a_promotion() -> None:
    primary = CacheStore()
    replica, changes, replica_clock = mirrored(primary)
    primary.set("k", b"v")
    primary.delete("k")
    for change in changes:
        replica.mirror(change)
    replica_clock.mirroring = False
    assert replica.set("k", b"w")[VERSION] > primary.revision


def test_export_and_load_copy_state_and_revision() -> None:
    source = CacheStore()
    source.set("a", b"1", ttl=100 * SECOND)
    source.mset([("b", b"2", None), ("c", b"3", None)])
    target = CacheStore()
    revision, items = source.export()
    target.load(revision, items)
    assert target.export() == source.export()
    assert target.get("a") is not None and target.get("a") == source.get("a")
    # A load adds: a snapshot arrives in pieces.
    halves = CacheStore()
    halves.load(revision, items[:1])
    halves.load(revision, items[1:])
    assert halves.export() == source.export()


def test_stores_sharing_a_budget_enforce_the_node_limit() -> None:
    budget = Budget(max_entries=4)
    one, two = CacheStore(budget=budget), CacheStore(budget=budget)
    for key in ("a", "b", "c"):
        one.set(key, b"x")
    two.set("d", b"x")
    assert budget.entries == 4
    two.set("e", b"x")  # no room: evicts from the store written, not the other one
    assert budget.entries == 4
    assert len(one) == 3 and two.get("d") is None and two.get("e") is not None


def test_a_store_with_nothing_to_evict_reports_the_node_full() -> None:
    budget = Budget(max_entries=2)
    one, two = CacheStore(budget=budget), CacheStore(budget=budget)
    one.set("a", b"x")
    one.set("b", b"x")
    with pytest.raises(CacheFullError):
        two.set("c", b"x")
    assert budget.entries == 2 and len(two) == 0


def test_mirrored_entries_count_against_the_budget() -> None:
    budget = Budget(max_bytes=10_000)
    primary = CacheStore()
    replica = CacheStore(budget=budget)
    changes: list[Change] = []
    primary.add_listener(changes.append)
    primary.set("k", b"v" * 100)
    for change in changes:
        replica.mirror(change)
    assert budget.entries == 1 and budget.bytes == replica.stats().bytes > 100
