"""Pure logic: group placement (balance, minimal movement, determinism)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping

import pytest

from common.clustermap import DEFAULT_GROUP_COUNT, group_ranges
from common.slots import SLOT_COUNT
from coordinator.placement import (
    Assignment,
    imbalance_percent,
    place,
    primary_moves,
    role_moves,
)

G = DEFAULT_GROUP_COUNT
NONE = Assignment("", ())


def _ids(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


def _empty(groups: int = G) -> dict[int, Assignment]:
    return {g: NONE for g in range(groups)}


def _members(a: Assignment) -> set[str]:
    return {a.primary, *a.replicas} - {""}


def _check(result: Mapping[int, Assignment], nodes: Iterable[str], replicas: int) -> None:
    """Every invariant `place` promises, with exact floor/ceil balance."""
    eligible = set(nodes)
    n = len(eligible)
    r = min(replicas, n - 1)
    primaries: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    for a in result.values():
        assert a.primary in eligible, a
        assert len(a.replicas) == r, a
        assert len(set(a.replicas)) == r, a
        assert a.primary not in a.replicas, a
        assert set(a.replicas) <= eligible, a
        primaries[a.primary] += 1
        roles.update(_members(a))
    groups = len(result)
    total = groups * (1 + r)
    for node in eligible:
        assert groups // n <= primaries[node] <= -(-groups // n), primaries
        assert total // n <= roles[node] <= -(-total // n), roles


def _slots_by_primary(result: Mapping[int, Assignment]) -> Counter[str]:
    ranges = group_ranges(len(result))
    slots: Counter[str] = Counter()
    for g, a in result.items():
        start, end = ranges[g]
        slots[a.primary] += end - start + 1
    return slots


@pytest.mark.parametrize("n", [3, 5, 10])
def test_from_scratch_is_balanced(n: int) -> None:
    nodes = _ids(n)
    result = place(_empty(), nodes, 1)
    _check(result, nodes, 1)
    slots = _slots_by_primary(result)
    assert max(slots.values()) <= 1.05 * SLOT_COUNT / n
    assert imbalance_percent(result, nodes) <= 5.0
    roles = Counter(x for a in result.values() for x in _members(a))
    assert max(roles.values()) - min(roles.values()) <= 1


@pytest.mark.parametrize("n", range(3, 11))
def test_adding_a_node_moves_about_its_share(n: int) -> None:
    nodes = _ids(n)
    before = place(_empty(), nodes, 1)
    after = place(before, [*nodes, "new"], 1)
    _check(after, [*nodes, "new"], 1)

    moved = primary_moves(before, after)
    moved_slots = sum(
        end - start + 1 for g, (start, end) in enumerate(group_ranges(G)) if g in moved
    )
    assert moved_slots / SLOT_COUNT <= 1.2 / (n + 1)
    assert all(after[g].primary == "new" for g in moved)
    assert sum(a.primary == "new" for a in after.values()) in (G // (n + 1), -(-G // (n + 1)))

    # Every role on the new node is a copy, and nothing else should be.
    fair_roles = 2 * G / (n + 1)
    assert role_moves(before, after) <= 1.2 * fair_roles
    new_replica_roles = sum(
        x not in _members(before[g]) for g, a in after.items() for x in a.replicas
    )
    assert new_replica_roles <= 1.2 * G / (n + 1)


def _assert_clean_removal(
    before: Mapping[int, Assignment], after: Mapping[int, Assignment], gone: str
) -> None:
    affected = {g for g, a in before.items() if gone in _members(a)}
    assert {g for g in before if after[g] != before[g]} <= affected
    for g, a in before.items():
        if a.primary == gone:
            assert after[g].primary in a.replicas  # promoted, not copied
    # One copy per lost role, no more.
    assert role_moves(before, after) == len(affected)


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10])
def test_removing_a_dead_node(n: int) -> None:
    nodes = _ids(n)
    before = place(_empty(), nodes, 1)
    for gone in nodes:
        rest = [x for x in nodes if x != gone]
        after = place(before, rest, 1)
        _check(after, rest, 1)
        _assert_clean_removal(before, after, gone)


@pytest.mark.parametrize(("n", "replicas"), [(4, 1), (6, 1), (6, 2), (9, 2)])
def test_draining_a_node(n: int, replicas: int) -> None:
    # Start from a placement that has seen a join, not only a fresh one.
    nodes = [*_ids(n), "late"]
    before = place(place(_empty(), nodes[:-1], replicas), nodes, replicas)
    for drained in (nodes[0], nodes[n // 2], "late"):
        rest = [x for x in nodes if x != drained]
        after = place(before, rest, replicas)
        _check(after, rest, replicas)
        _assert_clean_removal(before, after, drained)


def test_promotes_the_replica_on_the_node_with_fewest_primaries() -> None:
    current = {
        0: Assignment("dead", ("b", "c")),
        1: Assignment("dead", ("b", "c")),
        2: Assignment("b", ("c", "a")),
        3: Assignment("c", ("a", "b")),
        4: Assignment("a", ("b", "c")),
        5: Assignment("a", ("b", "c")),
    }
    after = place(current, ["a", "b", "c"], 2)
    _check(after, ["a", "b", "c"], 2)
    # b and c both hold one primary: tie goes to b, then c has fewer.
    assert after[0].primary == "b"
    assert after[1].primary == "c"
    assert role_moves(current, after) == 2  # "a" replaces "dead" in groups 0 and 1


def test_rebalances_primaries_by_swapping_with_a_replica() -> None:
    # Roles are balanced (4 per node), primaries are not: "a" has 4, "b" none. "b" is
    # a replica of two of a's groups, so swapping there fixes it without a copy.
    current = {
        0: Assignment("a", ("b",)),
        1: Assignment("a", ("c",)),
        2: Assignment("a", ("d",)),
        3: Assignment("a", ("b",)),
        4: Assignment("c", ("d",)),
        5: Assignment("d", ("c",)),
        6: Assignment("c", ("b",)),
        7: Assignment("d", ("b",)),
    }
    nodes = ["a", "b", "c", "d"]
    after = place(current, nodes, 1)
    _check(after, nodes, 1)
    assert role_moves(current, after) == 0
    assert primary_moves(current, after) == [0, 3]
    assert after[0] == Assignment("b", ("a",))
    assert after[3] == Assignment("b", ("a",))


def test_moves_a_primary_when_no_replica_can_take_it() -> None:
    # "c" is new: nobody can swap with it, so two primaries are copied to it.
    current = {g: Assignment(("a", "b")[g % 2], (("b", "a")[g % 2],)) for g in range(6)}
    after = place(current, ["a", "b", "c"], 1)
    _check(after, ["a", "b", "c"], 1)
    assert [after[g].primary for g in primary_moves(current, after)] == ["c", "c"]
    assert role_moves(current, after) == 4  # c's fair share of the 12 roles


def test_idempotent_and_deterministic() -> None:
    rnd = random.Random(7)
    nodes = _ids(7)
    start = place(_empty(), nodes[:5], 2)
    first = place(start, nodes, 2)
    assert place(first, nodes, 2) == first
    for _ in range(2):
        items = list(start.items())
        rnd.shuffle(items)
        shuffled_nodes = list(nodes)
        rnd.shuffle(shuffled_nodes)
        again = place(dict(items), shuffled_nodes, 2)
        assert again == first
        assert list(again) == sorted(again)


def test_one_node_has_no_replicas() -> None:
    result = place(place(_empty(), _ids(3), 1), ["node-01"], 1)
    _check(result, ["node-01"], 1)
    assert all(a == Assignment("node-01", ()) for a in result.values())


def test_two_nodes_with_two_replicas_get_one_each() -> None:
    result = place(_empty(), ["x", "y"], 2)
    _check(result, ["x", "y"], 2)
    assert all(len(a.replicas) == 1 for a in result.values())
    assert Counter(a.primary for a in result.values()) == {"x": G // 2, "y": G // 2}


def test_no_replicas() -> None:
    nodes = _ids(4)
    with_replicas = place(_empty(), nodes, 1)
    result = place(with_replicas, nodes, 0)
    _check(result, nodes, 0)
    assert all(a.replicas == () for a in result.values())
    assert primary_moves(with_replicas, result) == []
    # And back: the replica count grows by copies only, primaries stay.
    grown = place(result, nodes, 1)
    _check(grown, nodes, 1)
    assert primary_moves(result, grown) == []


def test_no_nodes() -> None:
    current = place(_empty(), _ids(3), 1)
    assert place(current, [], 1) == _empty()
    assert place({}, _ids(3), 1) == {}
    assert imbalance_percent(current, []) == 0.0
    with pytest.raises(ValueError):
        place(current, _ids(3), -1)


def test_sanitizes_current() -> None:
    # Duplicates, the primary listed as a replica and unknown nodes all disappear.
    current = {0: Assignment("a", ("a", "b", "b", "gone")), 1: Assignment("gone", ("b",))}
    result = place(current, ["a", "b", "c"], 1)
    _check(result, ["a", "b", "c"], 1)
    assert result[1].primary == "b"


def test_reporting_helpers() -> None:
    before = {0: Assignment("a", ("b",)), 1: Assignment("b", ("c",)), 2: NONE}
    after = {0: Assignment("b", ("a",)), 1: Assignment("b", ("a",)), 2: Assignment("c", ())}
    assert primary_moves(before, after) == [0, 2]
    assert role_moves(before, after) == 2  # (1, a) and (2, c); group 0 only swapped
    assert imbalance_percent(after, ["a", "b", "c"]) == pytest.approx(100.0)
    assert imbalance_percent(place(_empty(12), ["a", "b", "c"], 1), ["a", "b", "c"]) == 0.0


@pytest.mark.parametrize("replicas", [1, 2])
def test_random_joins_and_leaves_keep_every_invariant(replicas: int) -> None:
    rnd = random.Random(20240521 + replicas)
    pool = _ids(12)
    live = set(rnd.sample(pool, 4))
    current = place(_empty(), live, replicas)
    total = G * (1 + replicas)
    for step in range(30):
        joining = len(live) == 3 or (len(live) < len(pool) and rnd.random() < 0.5)
        changed = rnd.choice(sorted(set(pool) - live if joining else live))
        live = live | {changed} if joining else live - {changed}
        nodes = sorted(live)
        rnd.shuffle(nodes)
        result = place(current, nodes, replicas)
        _check(result, live, replicas)
        assert place(result, nodes, replicas) == result, step
        copies = role_moves(current, result)
        if joining:
            # Only the newcomer's share is copied, and only its primaries move.
            assert copies <= -(-total // len(live)), step
            assert len(primary_moves(current, result)) <= -(-G // len(live)), step
        else:
            # Every surviving role is kept; each lost one is copied once.
            lost = sum(changed in _members(a) for a in current.values())
            assert copies == lost, step
            for g, a in current.items():
                assert _members(a) - {changed} <= _members(result[g]), (step, g)
        current = result


def test_a_returning_node_is_given_back_the_groups_it_kept_on_disk() -> None:
    nodes = _ids(4)
    first = place(_empty(64), nodes, 1)
    gone = nodes[3]
    kept = {g for g, a in first.items() if gone in _members(a)}
    # Without it: its groups move to the other three (full copies, no way round).
    without = place(first, nodes[:3], 1)
    _check(without, nodes[:3], 1)
    # Back with its disk: as many of its seats as balance allows come from the
    # groups it kept, which catch up from the log; without the hint, others too.
    held = {g: [gone] for g in kept}
    back = place(without, nodes, 1, held)
    _check(back, nodes, 1)
    given = {g for g, a in back.items() if gone in _members(a)}
    assert len(given) == len(kept) and len(given - kept) <= 2
    led = {g for g, a in back.items() if a.primary == gone}
    assert led <= kept
    blind = {g for g, a in place(without, nodes, 1).items() if gone in _members(a)}
    assert len(blind - kept) > len(kept) // 3


def test_each_replica_step_is_the_one_a_full_search_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_Placer._path` keeps its direct steps in lanes between calls and skips the
    chain search when no free step exists; at every call, check both shortcuts
    against a scan of every step and a chain search, over random maps."""
    from coordinator import placement

    calls = Counter[str]()
    path = placement._Placer._path

    def checked(self: placement._Placer, planned_only: bool) -> list[tuple[str, str, int]] | None:
        sources = [n for n in self.nodes if self._excess(n) > 0]
        under = [n for n in self.nodes if self._excess(n) < 0]
        scanned = min(
            ((cost, self.pair.get((self.primary[g], y), 0), g, x, y)
             for x in sources for g, y, cost in self._steps(x, under, planned_only, 3)),
            default=None,
        )
        chain = self._chain(planned_only, scanned[0]) if scanned and scanned[0] else None
        got = path(self, planned_only)
        if scanned is None:
            calls["no direct step"] += 1
            assert got == self._chain(planned_only, 2 * len(self.nodes))
        elif chain is not None:
            calls["a cheaper chain"] += 1
            assert got == chain
        else:
            calls["direct"] += 1
            assert got == [(scanned[3], scanned[4], scanned[2])]
        return got

    monkeypatch.setattr(placement._Placer, "_path", checked)
    rnd = random.Random(11)
    pool = _ids(6)
    for _ in range(4000):
        groups = rnd.choice([4, 8, 8, 64])
        live = sorted(rnd.sample(pool, rnd.randint(2, 5)))
        # Any map and any copies on disk: a chain cheaper than every direct step
        # needs copies held off the map, and is rare even so.
        current = {
            g: Assignment(rnd.choice([*pool, ""]), tuple(rnd.sample(pool, rnd.randint(0, 3))))
            for g in range(groups)
        }
        held = {g: rnd.sample(pool, rnd.randint(0, 3)) for g in range(groups)}
        replicas = rnd.randint(1, 3)
        _check(place(current, live, replicas, held), live, replicas)
    # The maps led to all three kinds of turn.
    assert len(calls) == 3, calls


def test_avoided_nodes_lose_their_roles_in_a_group_and_get_none_back() -> None:
    # "a" reports "b" silent: the groups "a" leads replicate to "c" or "d" instead,
    # and balancing never seats "b" back in them.
    nodes = _ids(4)
    a, b = nodes[0], nodes[1]
    current = place(_empty(64), nodes, 1)
    led = [g for g, where in current.items() if where.primary == a]
    avoid = {g: (b,) for g in led}
    result = place(current, nodes, 1, avoid=avoid)
    _check(result, nodes, 1)
    for g in led:
        assert result[g].primary == a and b not in result[g].replicas
    moved = [g for g in led if b in current[g].replicas]
    assert moved, "some group led by a had its replica on b"
    # Only what must move moves: the groups a leads on b, and what rebalancing needs.
    assert role_moves(current, result) <= 2 * len(moved)


def test_an_avoided_node_keeps_its_role_when_no_other_node_can_take_it() -> None:
    # Two nodes: dropping the silent replica would leave one copy; it stays.
    current = place(_empty(8), ["a", "b"], 1)
    avoid = {g: ("b",) for g, where in current.items() if where.primary == "a"}
    assert place(current, ["a", "b"], 1, avoid=avoid) == current
