"""The coordinator's pure reconcile step, Drain and Rebalance, on hand-built maps."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable
from dataclasses import replace

import grpc
import pytest

from common.errors import MeshStatusError, Reason
from common.membership import NodeInfo
from common.slots import SLOT_COUNT
from coordinator.mapmodel import holds_role
from coordinator.operations import (
    apply_rebalance,
    lost_groups,
    mark_draining,
    plan_rebalance,
    recover_lost,
)
from coordinator.reconcile import Facts, initial_map, needed_positions, next_map, restarted_nodes
from mesh.admin.v1 import admin_pb2
from mesh.replication.v1 import replication_pb2 as rpb

JOINING, ACTIVE, DRAINING = (admin_pb2.NODE_STATE_JOINING, admin_pb2.NODE_STATE_ACTIVE,
                             admin_pb2.NODE_STATE_DRAINING)


def registered(*ids: str, started_at: float = 1.0) -> dict[str, NodeInfo]:
    return {i: NodeInfo(node_id=i, address=f"{i}:1", services=("cache",), version="t",
                        started_at=started_at) for i in ids}


def group(cmap: admin_pb2.ClusterMap, gid: int) -> admin_pb2.Group:
    return next(g for g in cmap.groups if g.group_id == gid)


def node(cmap: admin_pb2.ClusterMap, node_id: str) -> admin_pb2.Node:
    return next(n for n in cmap.nodes if n.node_id == node_id)


def primary_reports_all_in_sync(cmap: admin_pb2.ClusterMap,
                                reg: dict[str, NodeInfo]) -> Facts:
    """Facts where every asked primary counts every replica of its group as in sync."""
    positions = {}
    for node_id, gid in needed_positions(cmap, reg):
        g = group(cmap, gid)
        if node_id == g.primary_node_id:
            positions[node_id, gid] = rpb.GetPositionResponse(
                group_id=gid, role=rpb.GROUP_ROLE_PRIMARY,
                replicas=[rpb.ReplicaProgress(node_id=r.node_id, in_sync=True,
                                              since_epoch=r.since_epoch)
                          for r in g.replicas])
    return Facts(positions=positions)


def settle(cmap: admin_pb2.ClusterMap, reg: dict[str, NodeInfo], r: int,
           rounds: int = 10) -> admin_pb2.ClusterMap:
    """Run steps with cooperative primaries until nothing changes."""
    for _ in range(rounds):
        new = next_map(cmap, reg, primary_reports_all_in_sync(cmap, reg), r)
        if new is None:
            return cmap
        assert new.epoch == cmap.epoch + 1
        cmap = new
    raise AssertionError("the map did not settle")


def hand_map(groups: Iterable[tuple[int, str, list[tuple[str, bool]]]],
             nodes: Iterable[str], epoch: int = 5, r: int = 2) -> admin_pb2.ClusterMap:
    """A map from (group_id, primary, [(replica, in_sync)])."""
    cmap = admin_pb2.ClusterMap(epoch=epoch)
    for gid, primary, reps in groups:
        cmap.groups.add(group_id=gid, epoch=epoch, primary_node_id=primary,
                        desired_replicas=r,
                        slot_ranges=[admin_pb2.SlotRange(start=gid * 10, end=gid * 10 + 9)],
                        replicas=[admin_pb2.Replica(node_id=n, in_sync=s) for n, s in reps])
    for n in sorted(nodes):
        cmap.nodes.add(node_id=n, address=f"{n}:1", state=ACTIVE)
    return cmap


def assert_invariants(cmap: admin_pb2.ClusterMap) -> None:
    ids = {n.node_id for n in cmap.nodes}
    for g in cmap.groups:
        members = [g.primary_node_id, *(r.node_id for r in g.replicas)]
        assert len(members) == len(set(members)), g
        assert set(members) <= ids | {""}
        assert g.epoch <= cmap.epoch


# -- the first map ---------------------------------------------------------------------


def test_initial_map_is_balanced_and_in_sync() -> None:
    cmap = initial_map(registered("a", "b", "c"), group_count=12, replicas=1, now=10.0)
    assert cmap.epoch == 1
    assert sum(g.slot_ranges[0].end - g.slot_ranges[0].start + 1 for g in cmap.groups) \
        == SLOT_COUNT
    for g in cmap.groups:
        assert g.primary_node_id and len(g.replicas) == 1 and g.replicas[0].in_sync
        assert not g.HasField("target") and g.epoch == 1
    assert [n.state for n in cmap.nodes] == [ACTIVE] * 3
    assert sorted(len(n.primary_group_ids) for n in cmap.nodes) == [4, 4, 4]
    assert sorted(len(n.replica_group_ids) for n in cmap.nodes) == [4, 4, 4]
    assert next_map(cmap, registered("a", "b", "c"), Facts(), 1) is None


# -- a node joins ------------------------------------------------------------------------


def test_join_sets_targets_adds_catching_up_replicas_and_flips_only_when_in_sync() -> None:
    reg = registered("a", "b")
    cmap = initial_map(reg, group_count=8, replicas=1)
    reg = registered("a", "b", "c")

    joined = next_map(cmap, reg, Facts(), 1)
    assert joined is not None and joined.epoch == 2
    assert node(joined, "c").state == JOINING
    targeted = [g for g in joined.groups if g.HasField("target")]
    assert targeted, "the new node should be given groups"
    for g in targeted:
        assert "c" in (g.target.primary_node_id, *g.target.replica_node_ids)
        c_replica = [r for r in g.replicas if r.node_id == "c"]
        assert c_replica and not c_replica[0].in_sync  # catching up, not yet counted
        assert g.primary_node_id != "c"
    # Nothing reported yet: no change, no flip.
    assert next_map(joined, reg, Facts(), 1) is None
    # A primary that does not count the replica yet changes nothing either.
    gid = targeted[0].group_id
    not_yet = Facts(positions={(targeted[0].primary_node_id, gid): rpb.GetPositionResponse(
        role=rpb.GROUP_ROLE_PRIMARY, replicas=[rpb.ReplicaProgress(node_id="c", in_sync=False)])})
    assert next_map(joined, reg, not_yet, 1) is None
    # A report about an earlier assignment of "c" (from a primary that missed its
    # removal and re-assignment) does not count either.
    c_since = next(r.since_epoch for r in targeted[0].replicas if r.node_id == "c")
    stale = Facts(positions={(targeted[0].primary_node_id, gid): rpb.GetPositionResponse(
        role=rpb.GROUP_ROLE_PRIMARY,
        replicas=[rpb.ReplicaProgress(node_id="c", in_sync=True, since_epoch=c_since - 1)])})
    assert next_map(joined, reg, stale, 1) is None
    # The step asks exactly the primaries of the moving groups.
    assert needed_positions(joined, reg) == {(g.primary_node_id, g.group_id) for g in targeted}

    done = next_map(joined, reg, primary_reports_all_in_sync(joined, reg), 1)
    assert done is not None and done.epoch == 3
    assert node(done, "c").state == ACTIVE
    for g in done.groups:
        assert not g.HasField("target")
        assert len(g.replicas) == 1 and all(r.in_sync for r in g.replicas)
        before = group(joined, g.group_id)
        if g.primary_node_id != before.primary_node_id:
            assert g.epoch == 3  # primary changed: group epoch is this map's epoch
        else:
            assert g.epoch == before.epoch
    counts = sorted(len(n.primary_group_ids) + len(n.replica_group_ids) for n in done.nodes)
    assert counts[-1] - counts[0] <= 1
    assert next_map(done, reg, primary_reports_all_in_sync(done, reg), 1) is None


# -- a node leaves: failover ---------------------------------------------------------


def test_failover_promotes_the_in_sync_replica_with_the_highest_position() -> None:
    cmap = hand_map([(1, "a", [("b", True), ("c", True)]),
                     (2, "b", [("a", True), ("c", True)])], nodes="abc")
    reg = registered("b", "c")
    assert needed_positions(cmap, reg) == {("b", 1), ("c", 1)}
    facts = Facts(positions={
        ("b", 1): rpb.GetPositionResponse(applied_epoch=5, applied_seq=10),
        ("c", 1): rpb.GetPositionResponse(applied_epoch=5, applied_seq=12),
    })
    new = next_map(cmap, reg, facts, 2)
    assert new is not None and new.epoch == 6
    g1, g2 = group(new, 1), group(new, 2)
    assert g1.primary_node_id == "c" and g1.epoch == 6
    assert [r.node_id for r in g1.replicas] == ["b"]
    assert g2.primary_node_id == "b" and g2.epoch == 5  # its primary did not change
    assert "a" not in {n.node_id for n in new.nodes}
    assert not holds_role(new, "a")


def test_failover_epoch_beats_seq() -> None:
    cmap = hand_map([(1, "a", [("b", True), ("c", True)])], nodes="abc")
    facts = Facts(positions={
        ("b", 1): rpb.GetPositionResponse(applied_epoch=6, applied_seq=1),
        ("c", 1): rpb.GetPositionResponse(applied_epoch=5, applied_seq=99),
    })
    new = next_map(cmap, registered("b", "c"), facts, 2)
    assert new is not None and group(new, 1).primary_node_id == "b"


def test_failover_never_promotes_a_replica_that_is_not_in_sync() -> None:
    cmap = hand_map([(1, "a", [("b", False), ("c", True)]),
                     (2, "a", [("b", False)])], nodes="abc")
    reg = registered("b", "c")
    assert needed_positions(cmap, reg) == {("c", 1)}
    facts = Facts(positions={
        ("b", 1): rpb.GetPositionResponse(applied_epoch=9, applied_seq=999),
        ("c", 1): rpb.GetPositionResponse(applied_epoch=5, applied_seq=1),
    })
    new = next_map(cmap, reg, facts, 1)
    assert new is not None
    assert group(new, 1).primary_node_id == "c"
    g2 = group(new, 2)
    assert g2.primary_node_id == "" and g2.epoch == new.epoch  # unavailable, not promoted
    assert [(r.node_id, r.in_sync) for r in g2.replicas] == [("b", False)]


def test_failover_skips_a_replica_that_holds_nothing_and_ranks_unknown_last() -> None:
    cmap = hand_map([(1, "a", [("b", True), ("c", True), ("d", True)])], nodes="abcd", r=3)
    reg = registered("b", "c", "d")
    facts = Facts(positions={("d", 1): rpb.GetPositionResponse(applied_epoch=1, applied_seq=1)},
                  absent=frozenset({("b", 1)}))
    new = next_map(cmap, reg, facts, 3)
    assert new is not None and group(new, 1).primary_node_id == "d"
    # With nothing known at all, the first in-sync replica in map order is taken.
    new = next_map(cmap, reg, Facts(), 3)
    assert new is not None and group(new, 1).primary_node_id == "b"


def test_a_restarted_node_loses_its_roles_then_joins_again() -> None:
    cmap = hand_map([(1, "a", [("b", True)]), (2, "b", [("a", True)])], nodes="ab", r=1)
    reg = registered("a", "b")
    new = next_map(cmap, reg, Facts(restarted=frozenset({"a"})), 1)
    assert new is not None
    assert group(new, 1).primary_node_id == "b" and "a" not in {n.node_id for n in new.nodes}
    again = next_map(new, reg, Facts(), 1)
    assert again is not None and node(again, "a").state == JOINING


def test_a_restart_is_known_by_start_time_within_a_term_and_by_incarnation_across() -> None:
    cmap = hand_map([(1, "a", [("b", True)])], nodes="ab", r=1)
    reg = registered("a", "b")
    cmap = next_map(cmap, {n: replace(i, incarnation=f"{n}-1") for n, i in reg.items()},
                    Facts(), 1) or cmap
    assert node(cmap, "a").incarnation == "a-1"
    same = {n: replace(i, incarnation=f"{n}-1") for n, i in reg.items()}
    assert restarted_nodes(cmap, same, {}) == frozenset()
    assert restarted_nodes(cmap, same, {"a": 1.0, "b": 1.0}) == frozenset()
    # This term saw "a" start at 1.0: a new start time is a restart.
    later = {**same, "a": replace(same["a"], started_at=2.0)}
    assert restarted_nodes(cmap, later, {"a": 1.0}) == {"a"}
    # A new term saw nothing, but the map names the process it knew.
    again = {**same, "a": replace(same["a"], incarnation="a-2", started_at=2.0)}
    assert restarted_nodes(cmap, again, {}) == {"a"}
    # Nodes the map does not hold yet, or that name no incarnation, are not restarts.
    assert restarted_nodes(cmap, {**again, "c": replace(same["a"], node_id="c")}, {}) == {"a"}
    assert restarted_nodes(cmap, {**same, "a": replace(same["a"], incarnation="")}, {}) == set()
    # Counted as restarted, it loses its roles; the next round it joins again.
    new = next_map(cmap, again, Facts(restarted=restarted_nodes(cmap, again, {})), 1)
    assert new is not None and group(new, 1).primary_node_id == "b"
    assert restarted_nodes(new, again, {}) == frozenset()


def test_a_group_whose_members_all_leave_remembers_its_last_copies() -> None:
    cmap = hand_map([(1, "a", [("b", True), ("c", False)])], nodes="abc", r=2)
    new = next_map(cmap, registered("c"), Facts(), 2)
    assert new is not None
    g = group(new, 1)
    assert g.primary_node_id == "" and list(g.lost_copies) == ["a", "b"]  # c was not in sync
    assert needed_positions(new, registered("a", "c")) == {("a", 1)}


def test_a_lost_group_comes_back_from_the_best_copy_of_its_last_members() -> None:
    lost = hand_map([(1, "", []), (2, "", [])], nodes="", r=1)
    for g in lost.groups:
        g.lost_copies.extend(["a", "b"])
    reg = registered("a", "b", "c")
    facts = Facts(positions={
        ("a", 1): rpb.GetPositionResponse(applied_epoch=4, applied_seq=90),
        ("b", 1): rpb.GetPositionResponse(applied_epoch=5, applied_seq=10),
    }, absent=frozenset({("a", 2)}))
    new = next_map(lost, reg, facts, 1)
    assert new is not None
    g1 = group(new, 1)
    assert g1.primary_node_id == "b" and g1.epoch == new.epoch  # epoch before seq
    assert not g1.lost_copies and g1.origin_epoch == 0  # the same history goes on
    # Group 2: a holds nothing of it and b has not answered: b may hold it; wait.
    assert group(new, 2).primary_node_id == ""
    # Once both say they hold nothing, nothing durable was lost: it comes back empty.
    facts = Facts(absent=frozenset({("a", 2), ("b", 2)}))
    again = next_map(new, reg, facts, 1)
    assert again is not None and group(again, 2).primary_node_id == "a"
    assert_invariants(again)


def test_copies_of_nodes_that_were_not_in_sync_never_revive_a_group() -> None:
    lost = hand_map([(1, "", [])], nodes="", r=1)
    group(lost, 1).lost_copies.append("a")
    facts = Facts(positions={("z", 1): rpb.GetPositionResponse(applied_epoch=9, applied_seq=9)})
    new = next_map(lost, registered("z"), facts, 1)
    assert new is not None and group(new, 1).primary_node_id == ""


# -- drain -----------------------------------------------------------------------------------


def test_drain_empties_the_node_then_it_leaves() -> None:
    reg = registered("a", "b", "c")
    cmap = initial_map(reg, group_count=9, replicas=1)
    drained = mark_draining(cmap, "b", 1)
    assert drained is not None and drained.epoch == 2
    assert node(drained, "b").state == DRAINING
    assert mark_draining(drained, "b", 1) is None  # already draining

    cmap = settle(drained, reg, 1)
    assert node(cmap, "b").state == DRAINING
    assert not holds_role(cmap, "b")
    for g in cmap.groups:
        assert g.primary_node_id in ("a", "c") and len(g.replicas) == 1
    cmap = settle(cmap, registered("a", "c"), 1)  # b exits by itself
    assert [n.node_id for n in cmap.nodes] == ["a", "c"]


def test_drain_refusals() -> None:
    cmap = initial_map(registered("a", "b"), group_count=4, replicas=1)
    with pytest.raises(MeshStatusError) as unknown:
        mark_draining(cmap, "zz", 1)
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    assert unknown.value.reason == Reason.NODE_NOT_FOUND
    # Two nodes, one replica each: the other node cannot take b's replicas.
    with pytest.raises(MeshStatusError) as short:
        mark_draining(cmap, "b", 1)
    assert short.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert short.value.reason == Reason.NOT_ENOUGH_NODES
    alone = initial_map(registered("a"), group_count=4, replicas=0)
    with pytest.raises(MeshStatusError):
        mark_draining(alone, "a", 0)


# -- rebalance ---------------------------------------------------------------------------------


def test_rebalance_plans_moves_and_refuses_while_moving() -> None:
    cmap = hand_map([(g, "a", [("b", True)]) for g in range(1, 7)], nodes="abc", r=1)
    plan = plan_rebalance(cmap, 1)
    assert plan.moves and plan.imbalance_before_percent > plan.imbalance_after_percent
    assert plan.slots_moved == 10 * sum(
        m.from_primary_node_id != m.to_primary_node_id for m in plan.moves)
    applied = apply_rebalance(cmap, plan)
    assert applied is not None and applied.epoch == cmap.epoch + 1
    assert {g.group_id for g in applied.groups if g.HasField("target")} == {
        m.group_id for m in plan.moves}
    with pytest.raises(MeshStatusError) as busy:
        apply_rebalance(applied, plan)
    assert busy.value.code == grpc.StatusCode.ABORTED
    assert busy.value.reason == Reason.MIGRATION_IN_PROGRESS


# -- epochs ------------------------------------------------------------------------------------


def test_epochs_only_grow_and_group_epochs_follow_primary_changes() -> None:
    rng = random.Random(7)
    pool = [f"n{i}" for i in range(6)]
    live = set(pool[:3])
    cmap = initial_map(registered(*sorted(live)), group_count=16, replicas=1)
    seen_group_epochs = {g.group_id: g.epoch for g in cmap.groups}
    for _ in range(40):
        action = rng.choice(["join", "leave", "sync", "drain"])
        if action == "join" and len(live) < len(pool):
            live.add(rng.choice([n for n in pool if n not in live]))
        elif action == "leave" and len(live) > 2:
            live.discard(rng.choice(sorted(live)))
        elif action == "drain" and len(live) > 3:
            with contextlib.suppress(MeshStatusError):  # a refused drain is fine here
                drained = mark_draining(cmap, rng.choice(sorted(
                    n.node_id for n in cmap.nodes)), 1)
                if drained is not None:
                    assert drained.epoch == cmap.epoch + 1
                    cmap = drained
        reg = registered(*sorted(live))
        facts = primary_reports_all_in_sync(cmap, reg) if action == "sync" else Facts()
        new = next_map(cmap, reg, facts, 1)
        if new is None:
            continue
        assert new.epoch == cmap.epoch + 1
        assert_invariants(new)
        for g in new.groups:
            old = group(cmap, g.group_id)
            assert g.epoch >= seen_group_epochs[g.group_id]
            if g.primary_node_id != old.primary_node_id:
                assert g.epoch == new.epoch
            else:
                assert g.epoch == old.epoch
            seen_group_epochs[g.group_id] = g.epoch
        cmap = new


# -- RecoverLostGroups ------------------------------------------------------------------


def test_recover_lost_places_lost_groups_empty_at_a_new_epoch() -> None:
    cmap = hand_map([(1, "a", [("b", True)]), (2, "", [("b", False)]), (3, "", [])],
                    nodes="ab", r=1)
    group(cmap, 3).lost_copies.append("gone-for-good")
    assert [g.group_id for g in lost_groups(cmap)] == [2, 3]
    new = recover_lost(cmap, 1, now=20.0)
    assert new is not None and new.epoch == cmap.epoch + 1
    assert group(new, 1) == group(cmap, 1)  # untouched
    for gid in (2, 3):
        g = group(new, gid)
        assert g.primary_node_id in ("a", "b")
        assert g.epoch == g.origin_epoch == new.epoch and not g.lost_copies
        # Its replica starts catching up, even a node that had a (partial) copy.
        assert [(r.in_sync, r.since_epoch) for r in g.replicas] == [(False, new.epoch)]
        assert g.replicas[0].node_id != g.primary_node_id
    assert not lost_groups(new)
    assert_invariants(new)
    # The reconcile loop then takes them in sync like any new replica.
    settled = settle(new, registered("a", "b"), 1)
    assert all(r.in_sync for g in settled.groups for r in g.replicas)
    assert recover_lost(settled, 1) is None


def test_recover_lost_needs_a_node() -> None:
    cmap = hand_map([(1, "", [])], nodes="")
    with pytest.raises(MeshStatusError) as info:
        recover_lost(cmap, 1)
    assert info.value.reason == Reason.NOT_ENOUGH_NODES


# -- a replica its primary cannot reach --------------------------------------------------


def test_a_replica_its_primary_reports_silent_is_replaced_in_the_groups_it_leads() -> None:
    reg = registered("a", "b", "c")
    cmap = initial_map(reg, group_count=12, replicas=1)
    cut = {g.group_id for g in cmap.groups
           if g.primary_node_id == "a" and g.replicas[0].node_id == "b"}
    assert cut
    # "a" can no longer reach "b", and both keep their etcd leases.
    reg["a"] = replace(reg["a"], stalled=("b",))
    planned = next_map(cmap, reg, Facts(), 1)
    assert planned is not None
    for gid in cut:
        g = group(planned, gid)
        assert g.target.primary_node_id == "a" and list(g.target.replica_node_ids) == ["c"]
        # Until "c" is in sync, "b" stays in sync: the group's writes wait (its
        # acknowledged writes are never held by fewer copies than the map says).
        assert [(r.node_id, r.in_sync) for r in g.replicas] == [("b", True), ("c", False)]
        assert g.epoch == group(cmap, gid).epoch
    settled = settle(planned, reg, 1)
    assert_invariants(settled)
    for g in settled.groups:
        assert len(g.replicas) == 1 and g.replicas[0].in_sync
        if g.primary_node_id == "a":
            assert g.replicas[0].node_id != "b"
    for gid in cut:
        assert group(settled, gid).replicas[0].node_id == "c"
    # No primary moved (rebalancing may hand "b" replicas of groups others lead).
    assert all(group(settled, g.group_id).primary_node_id == g.primary_node_id
               for g in cmap.groups)


def test_a_silent_replica_with_no_node_to_take_its_place_stays() -> None:
    reg = registered("a", "b")
    cmap = initial_map(reg, group_count=4, replicas=1)
    reg["a"] = replace(reg["a"], stalled=("b",))
    assert next_map(cmap, reg, Facts(), 1) is None


def test_a_primary_cut_off_from_every_replica_fails_over_while_still_registered() -> None:
    # "a" reaches neither "b" nor "c" (a blocked peer port), but etcd and clients
    # still reach it: the two report it silent, and it reports them.
    reg = registered("a", "b", "c")
    cmap = initial_map(reg, group_count=12, replicas=1)
    led = {g.group_id: g.replicas[0].node_id for g in cmap.groups if g.primary_node_id == "a"}
    reg["a"] = replace(reg["a"], stalled=("b", "c"))
    reg["b"] = replace(reg["b"], stalled=("a",))
    reg["c"] = replace(reg["c"], stalled=("a",))
    assert needed_positions(cmap, reg) >= {(r, g) for g, r in led.items()}
    moved = next_map(cmap, reg, Facts(), 1)
    assert moved is not None
    for gid, replica in led.items():
        g = group(moved, gid)
        # Its in-sync replica leads, at a new epoch (which fences "a").
        assert g.primary_node_id == replica and g.epoch == moved.epoch
        assert "a" not in [r.node_id for r in g.replicas]
    settled = settle(moved, reg, 1)
    assert_invariants(settled)
    for g in settled.groups:
        members = {g.primary_node_id, *(r.node_id for r in g.replicas)}
        assert "a" not in members  # every node that leads a group reports it silent
        assert len(g.replicas) == 1 and g.replicas[0].in_sync


def test_one_silent_link_replaces_the_replica_and_never_fails_over() -> None:
    # Each end of one cut link reports the other: whose fault it is is unknown.
    reg = registered("a", "b", "c")
    cmap = initial_map(reg, group_count=12, replicas=1)
    reg["a"] = replace(reg["a"], stalled=("b",))
    reg["b"] = replace(reg["b"], stalled=("a",))
    settled = settle(cmap, reg, 1)
    for g in settled.groups:
        assert g.primary_node_id == group(cmap, g.group_id).primary_node_id
        assert frozenset((g.primary_node_id, g.replicas[0].node_id)) != {"a", "b"}


def test_when_every_node_is_cut_from_the_others_nothing_fails_over() -> None:
    # Each reported by both others: a failover would leave the group on one copy
    # with no replica it can reach. It waits for the heal.
    reg = registered("a", "b", "c")
    cmap = initial_map(reg, group_count=12, replicas=1)
    for n in ("a", "b", "c"):
        reg[n] = replace(reg[n], stalled=tuple(sorted({"a", "b", "c"} - {n})))
    assert next_map(cmap, reg, Facts(), 1) is None
