"""The reconcile step, a pure function: (map, membership, facts) -> next map.

One call does, in order:

a. membership: registered nodes missing from the map join as JOINING; map
   nodes no longer registered leave, and for each group one of them was primary
   of, the live in-sync replica with the highest applied position is promoted
   (never a replica that is not in sync: with none left the group has no
   primary and is unavailable until an operator calls RecoverLostGroups);
b. planning: ``place()`` over JOINING and ACTIVE nodes, starting from where
   each group is going (its target, else its members), and seating no replica
   the group's primary reports silent (``NodeInfo.stalled``); a group whose
   desired members differ from its current ones gets that as its ``target``;
c. progress: target members join their group as catching-up replicas, become
   in sync when the group's primary reports so, and once every target member
   is the primary or an in-sync replica the group flips to its target;
d. JOINING nodes with no catching-up replica become ACTIVE.

A group's epoch becomes the new map epoch whenever its primary changes. The
result is None when nothing changed, so the caller writes only real changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.clustermap import group_ranges
from common.membership import NodeInfo
from coordinator.mapmodel import (
    assignments,
    catching_up,
    eligible_nodes,
    fill_counts,
    members,
    new_node,
    refresh_node,
    same,
    set_target,
    stamp,
    target,
)
from coordinator.placement import Assignment, place
from mesh.admin.v1 import admin_pb2
from mesh.replication.v1 import replication_pb2

log = logging.getLogger(__name__)

NodeGroup = tuple[str, int]
"""(node_id, group_id)."""


@dataclass(frozen=True)
class Facts:
    """What the nodes told the coordinator this round."""

    positions: Mapping[NodeGroup, replication_pb2.GetPositionResponse] = field(
        default_factory=dict)
    """GetPosition answers; a pair missing here did not answer (unknown)."""
    absent: frozenset[NodeGroup] = frozenset()
    """Pairs answered NOT_FOUND: the node holds nothing of the group."""
    restarted: frozenset[str] = frozenset()
    """Nodes that registered again (new process, same id): their old roles are lost."""


def initial_map(registered: Mapping[str, NodeInfo], group_count: int, replicas: int,
                now: float | None = None) -> admin_pb2.ClusterMap:
    """The first map: every group placed at once, all in sync (there is no data yet)."""
    now = time.time() if now is None else now
    ranges = group_ranges(group_count)
    blank = {gid: Assignment("", ()) for gid in range(1, group_count + 1)}
    plan = place(blank, sorted(registered), replicas)
    cmap = admin_pb2.ClusterMap(epoch=1)
    for gid, (start, end) in enumerate(ranges, 1):
        where = plan[gid]
        cmap.groups.add(
            group_id=gid, epoch=1, primary_node_id=where.primary, desired_replicas=replicas,
            slot_ranges=[admin_pb2.SlotRange(start=start, end=end)],
            replicas=[admin_pb2.Replica(node_id=n, in_sync=True, since_epoch=1)
                      for n in where.replicas])
    for node_id in sorted(registered):
        cmap.nodes.append(new_node(registered[node_id], admin_pb2.NODE_STATE_ACTIVE, now))
    fill_counts(cmap)
    stamp(cmap, now)
    return cmap


def restarted_nodes(current: admin_pb2.ClusterMap, registered: Mapping[str, NodeInfo],
                    seen: Mapping[str, float]) -> frozenset[str]:
    """Registered nodes whose process is not the one they were: a start time other
    than this term's last round saw (``seen``), or an incarnation other than the
    map's. Their copies lost their in-memory state, so their roles are lost.

    The map's incarnation is what a new term knows: a node that restarted while
    no coordinator led (both restarted together) has a start time no round of
    this term saw, and used to keep leading with empty caches and lock tables.
    """
    recorded = {n.node_id: n.incarnation for n in current.nodes}

    def restarted(node_id: str, info: NodeInfo) -> bool:
        if node_id in seen and seen[node_id] != info.started_at:
            return True
        known = recorded.get(node_id, "")  # "": not in the map, or from an older version
        return bool(known and info.incarnation and known != info.incarnation)

    return frozenset(node_id for node_id, info in registered.items()
                     if restarted(node_id, info))


def needed_positions(current: admin_pb2.ClusterMap, registered: Mapping[str, NodeInfo],
                     restarted: frozenset[str] = frozenset()) -> set[NodeGroup]:
    """The GetPosition calls the next step wants: the in-sync replicas of groups
    whose primary left, the primaries of groups with catching-up replicas, and
    the returning holders of lost groups' last copies."""
    live = set(registered) - restarted
    cut_off = cut_off_primaries(registered)
    need: set[NodeGroup] = set()
    for group in current.groups:
        primary = group.primary_node_id
        if not primary:
            need.update((n, group.group_id) for n in group.lost_copies if n in live)
            continue
        if primary not in live or _unreachable_group(group, registered, cut_off):
            need.update((r.node_id, group.group_id) for r in group.replicas
                        if r.in_sync and r.node_id in live)
        elif any(not r.in_sync for r in group.replicas):
            need.add((primary, group.group_id))
    return need


def cut_off_primaries(registered: Mapping[str, NodeInfo]) -> frozenset[str]:
    """Nodes that two or more others report silent (`NodeInfo.stalled`): then the
    fault is most likely theirs, not one link's (a blocked peer port, a NIC
    down), and the groups they lead may fail over (see `_unreachable_group`).
    One report says nothing of whose fault it is: a cut between two nodes has
    each report the other, and the replica is replaced instead."""
    reporters: dict[str, int] = {}
    for info in registered.values():
        for node_id in set(info.stalled):
            reporters[node_id] = reporters.get(node_id, 0) + 1
    return frozenset(n for n, count in reporters.items() if count >= 2 and n in registered)


def _unreachable_group(group: admin_pb2.Group, registered: Mapping[str, NodeInfo],
                       cut_off: frozenset[str]) -> bool:
    """Whether ``group``'s primary is cut off and reaches none of its in-sync
    replicas: no other replica can catch up from it, so only a failover to one of
    them lets the group take writes again."""
    primary = group.primary_node_id
    if primary not in cut_off:
        return False
    in_sync = [r.node_id for r in group.replicas if r.in_sync]
    return bool(in_sync) and set(in_sync) <= set(registered[primary].stalled)


def next_map(current: admin_pb2.ClusterMap, registered: Mapping[str, NodeInfo], facts: Facts,
             replicas: int, now: float | None = None) -> admin_pb2.ClusterMap | None:
    """The map that should follow ``current``, or None if nothing changes."""
    now = time.time() if now is None else now
    epoch = current.epoch + 1
    new = admin_pb2.ClusterMap()
    new.CopyFrom(current)
    live = {n for n in registered if n not in facts.restarted}
    _join(new, registered, live, now)
    _depart(new, live, facts, epoch)
    _fail_over_cut_off(new, registered, facts, epoch)
    _revive(new, live, facts, epoch)
    _plan(new, replicas, registered)
    _progress(new, facts, epoch)
    _activate(new)
    for group in new.groups:
        group.desired_replicas = replicas
    fill_counts(new)
    if _same_content(current, new):
        return None
    new.epoch = epoch
    stamp(new, now)
    return new


def _first(items: Sequence[object], sep: str, limit: int = 20) -> str:
    """The first ``limit`` of ``items`` for a log line, "..." marking the rest."""
    return sep.join(map(str, items[:limit])) + (f"{sep}..." if len(items) > limit else "")


def _same_content(a: admin_pb2.ClusterMap, b: admin_pb2.ClusterMap) -> bool:
    a2, b2 = admin_pb2.ClusterMap(), admin_pb2.ClusterMap()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    for m in (a2, b2):
        m.epoch = 0
        m.ClearField("update_time")
    return a2 == b2


def _join(new: admin_pb2.ClusterMap, registered: Mapping[str, NodeInfo], live: set[str],
          now: float) -> None:
    known = {n.node_id: n for n in new.nodes}
    for node_id in sorted(live):
        node = known.get(node_id)
        if node is None:
            log.info("node %s joins", node_id)
            known[node_id] = new_node(registered[node_id], admin_pb2.NODE_STATE_JOINING, now)
        else:
            refresh_node(node, registered[node_id])
    nodes = [known[k] for k in sorted(known)]
    del new.nodes[:]
    new.nodes.extend(nodes)


def _depart(new: admin_pb2.ClusterMap, live: set[str], facts: Facts, epoch: int) -> None:
    gone = {n.node_id for n in new.nodes if n.node_id not in live}
    if not gone:
        return
    lost: list[int] = []
    for group in new.groups:
        copies = [group.primary_node_id, *(r.node_id for r in group.replicas if r.in_sync)]
        if group.primary_node_id in gone and not _promote(group, gone, facts, epoch):
            lost.append(group.group_id)
            del group.lost_copies[:]
            group.lost_copies.extend(copies)
        kept = [r for r in group.replicas if r.node_id not in gone]
        if len(kept) != len(group.replicas):
            del group.replicas[:]
            group.replicas.extend(kept)
        going = target(group)
        if going is not None and gone.intersection((going.primary, *going.replicas)):
            set_target(group, None)  # planned again from the members left
    nodes = [n for n in new.nodes if n.node_id not in gone]
    del new.nodes[:]
    new.nodes.extend(nodes)
    for node_id in sorted(gone):
        log.info("node %s left the map", node_id)
    if lost:
        shown = _first(lost, ",")
        log.error("%d group(s) lost their primary and have no in-sync replica left: their "
                  "slots are unavailable until a node that held them comes back with its "
                  "durable copy, or `meshctl recover` (groups %s)", len(lost), shown)


def _fail_over_cut_off(new: admin_pb2.ClusterMap, registered: Mapping[str, NodeInfo],
                       facts: Facts, epoch: int) -> None:
    """Promote an in-sync replica in the groups whose primary reaches none of them
    and is itself reported silent by others (`cut_off_primaries`). It is a
    failover like a departure's, with the primary still registered: the new
    epoch fences it, and it keeps no role in the group.

    Only a replica that is not cut off itself is promoted: when every node is
    cut from the others (each reported by two), no failover would give a group
    a replica again, and it would go on acknowledging writes on one copy; it
    waits for the heal instead."""
    cut_off = cut_off_primaries(registered)
    if not cut_off:
        return
    moved: list[str] = []
    for group in new.groups:
        if not _unreachable_group(group, registered, cut_off):
            continue
        if all((r.node_id, group.group_id) in facts.absent or r.node_id in cut_off
               for r in group.replicas if r.in_sync):
            continue  # none to promote (cut off too, or restarted empty): keep waiting
        old = group.primary_node_id
        if _promote(group, {old, *cut_off}, facts, epoch):
            going = target(group)
            if going is not None and old in (going.primary, *going.replicas):
                set_target(group, None)  # planned again from the members left
            moved.append(f"{group.group_id} ({old} -> {group.primary_node_id})")
    if moved:
        log.warning("%d group(s) fail over: their primary reaches none of their in-sync "
                    "replicas and other nodes report it silent too: %s", len(moved),
                    _first(moved, " "))


def _revive(new: admin_pb2.ClusterMap, live: set[str], facts: Facts, epoch: int) -> None:
    """Give lost groups a primary again from the copies their last members kept.

    Every node in ``lost_copies`` held an in-sync copy, so each one's disk has
    every acknowledged durable write: the first back with a copy becomes the
    primary (the highest position if several are). A group none of them kept
    anything of comes back empty once all of them are back (nothing durable
    was written to it); until then the ones still away might hold it.
    """
    revived: list[int] = []
    for group in new.groups:
        if group.primary_node_id or not group.lost_copies:
            continue
        gid = group.group_id
        back = [n for n in group.lost_copies if n in live]
        found = [(facts.positions[(n, gid)], n) for n in back if (n, gid) in facts.positions]
        if found:
            position, chosen = max(found, key=lambda f: (f[0].applied_epoch, f[0].applied_seq))
            where = f"its copy at {position.applied_epoch}/{position.applied_seq}"
        elif len(back) == len(group.lost_copies) and all((n, gid) in facts.absent for n in back):
            chosen, where = back[0], "empty (no copy holds durable state)"
        else:
            continue
        group.primary_node_id = chosen
        group.epoch = epoch
        del group.replicas[:]
        del group.lost_copies[:]
        revived.append(gid)
        log.debug("group %d: revived on %s from %s, epoch %d", gid, chosen, where, epoch)
    if revived:
        shown = _first(revived, ",")
        log.warning("%d lost group(s) revived from the copies their last members kept: "
                    "durable state is back; in-memory state too from a node that never "
                    "stopped, else it starts empty (groups %s)",
                    len(revived), shown)


def _promote(group: admin_pb2.Group, gone: set[str], facts: Facts, epoch: int) -> bool:
    """Promote the best in-sync replica; False if there is none (the group is lost)."""
    old = group.primary_node_id
    gid = group.group_id
    candidates = [r.node_id for r in group.replicas
                  if r.in_sync and r.node_id not in gone and (r.node_id, gid) not in facts.absent]
    group.epoch = epoch
    if not candidates:
        group.primary_node_id = ""
        return False

    def rank(item: tuple[int, str]) -> tuple[int, int, int, int]:
        # Known positions first, highest (epoch, seq) first; then map order.
        index, node_id = item
        pos = facts.positions.get((node_id, gid))
        if pos is None:
            return (0, 0, 0, -index)
        return (1, pos.applied_epoch, pos.applied_seq, -index)

    _, chosen = max(enumerate(candidates), key=rank)
    pos = facts.positions.get((chosen, gid))
    kept = [r for r in group.replicas if r.node_id != chosen]
    del group.replicas[:]
    group.replicas.extend(kept)
    group.primary_node_id = chosen
    log.info("group %d: promoted %s (position %s) in place of %s, epoch %d", gid, chosen,
             f"{pos.applied_epoch}/{pos.applied_seq}" if pos else "unknown", old, epoch)
    return True


def _plan(new: admin_pb2.ClusterMap, replicas: int,
          registered: Mapping[str, NodeInfo]) -> None:
    eligible = eligible_nodes(new)
    if not eligible:
        return
    # A joining node that restarted with its disk catches up the groups it kept
    # from the log: placement prefers seating it in those.
    held: dict[int, list[str]] = {}
    for node in new.nodes:
        info = registered.get(node.node_id)
        if node.state == admin_pb2.NODE_STATE_JOINING and info is not None:
            for group_id in info.copies:
                held.setdefault(group_id, []).append(node.node_id)
    # Replicas a primary reports silent (`nodes.stalls`) are replaced in the
    # groups it leads: their writes wait for them until the new copy is in sync.
    avoid = {g.group_id: info.stalled for g in new.groups
             if (info := registered.get(g.primary_node_id)) is not None and info.stalled}
    desired = place(assignments(new.groups, use_targets=True), eligible, replicas, held, avoid)
    replacing: list[str] = []
    for group in new.groups:
        want = desired.get(group.group_id)
        if want is None or not group.primary_node_id:
            continue
        if same(want, members(group)) and all(r.in_sync for r in group.replicas):
            set_target(group, None)
            continue
        going = target(group)
        if going is None or not same(going, want):
            set_target(group, want)
            silent = set(avoid.get(group.group_id, ())).intersection(members(group).replicas)
            if silent:
                replacing.append(f"{group.group_id} ({','.join(sorted(silent))})")
    if replacing:
        log.warning("%d group(s) get other replicas in place of replicas their primary reports "
                    "silent; they take writes again once the new copies are in sync: %s",
                    len(replacing), _first(replacing, " "))


def _progress(new: admin_pb2.ClusterMap, facts: Facts, epoch: int) -> None:
    for group in new.groups:
        if not group.primary_node_id:
            continue
        going = target(group)
        if going is not None:
            have = {group.primary_node_id, *(r.node_id for r in group.replicas)}
            for node_id in (going.primary, *going.replicas):
                if node_id not in have:
                    group.replicas.add(node_id=node_id, in_sync=False, since_epoch=epoch)
                    have.add(node_id)
        report = facts.positions.get((group.primary_node_id, group.group_id))
        if report is not None and report.role == replication_pb2.GROUP_ROLE_PRIMARY:
            # Only a report about this very assignment counts: a primary that
            # missed the replica's removal may still vouch for its old copy.
            synced = {(p.node_id, p.since_epoch) for p in report.replicas if p.in_sync}
            for replica in group.replicas:
                if not replica.in_sync and (replica.node_id, replica.since_epoch) in synced:
                    replica.in_sync = True
                    log.debug("group %d: replica %s is in sync", group.group_id,
                              replica.node_id)
        if going is not None:
            _maybe_flip(group, going, epoch)


def _maybe_flip(group: admin_pb2.Group, going: Assignment, epoch: int) -> None:
    ready = {group.primary_node_id, *(r.node_id for r in group.replicas if r.in_sync)}
    if not ready.issuperset((going.primary, *going.replicas)):
        return
    before = members(group)
    # Replicas keep their assignment; the old primary staying on as a replica
    # starts a new one.
    since = {r.node_id: r.since_epoch for r in group.replicas}
    group.primary_node_id = going.primary
    del group.replicas[:]
    group.replicas.extend(admin_pb2.Replica(node_id=n, in_sync=True,
                                            since_epoch=since.get(n, epoch))
                          for n in going.replicas)
    set_target(group, None)
    if going.primary != before.primary:
        group.epoch = epoch
    log.info("group %d: flipped to primary %s replicas %s (was %s %s), epoch %d",
             group.group_id, going.primary, list(going.replicas), before.primary,
             list(before.replicas), group.epoch)


def _activate(new: admin_pb2.ClusterMap) -> None:
    pending = catching_up(new)
    for node in new.nodes:
        if node.state == admin_pb2.NODE_STATE_JOINING and node.node_id not in pending:
            node.state = admin_pb2.NODE_STATE_ACTIVE
            log.info("node %s is active", node.node_id)
