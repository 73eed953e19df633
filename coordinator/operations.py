"""Admin changes to the map, as pure functions: Drain, Rebalance, RecoverLostGroups.

Drain and Rebalance only mark intent (a node DRAINING, group targets); the
reconcile loop then moves the roles the way it moves any other: catch up, then
flip. RecoverLostGroups places groups that have no copy left, empty.
"""

from __future__ import annotations

import time

import grpc

from common.clustermap import slot_count
from common.errors import MeshStatusError, Reason
from coordinator.mapmodel import (
    assignments,
    eligible_nodes,
    holds_role,
    same,
    stamp,
)
from coordinator.placement import Assignment, imbalance_percent, place, primary_moves
from mesh.admin.v1 import admin_pb2


def find_node(cmap: admin_pb2.ClusterMap | None, node_id: str) -> admin_pb2.Node:
    for node in cmap.nodes if cmap is not None else ():
        if node.node_id == node_id:
            return node
    raise MeshStatusError(grpc.StatusCode.NOT_FOUND, f"node {node_id!r} is not in the map",
                          Reason.NODE_NOT_FOUND, metadata={"node_id": node_id})


def check_drain(cmap: admin_pb2.ClusterMap, node_id: str, replicas: int) -> admin_pb2.Node:
    """The node to drain, or NODE_NOT_FOUND / NOT_ENOUGH_NODES."""
    node = find_node(cmap, node_id)
    if node.state == admin_pb2.NODE_STATE_DRAINING:
        return node
    eligible = eligible_nodes(cmap)
    others = [n for n in eligible if n != node_id]
    holds = holds_role(cmap, node_id)
    # Its roles must have somewhere to go: no other node at all, or fewer than the
    # groups' sizes need (so its replicas would be lost, not moved).
    if (not others and (replicas > 0 or node.primary_slots > 0)) or (
            holds and len(others) < min(replicas + 1, len(eligible))):
        raise MeshStatusError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"draining {node_id} would leave groups without a primary or below "
            f"{replicas} replicas: {len(others)} other eligible node(s)",
            Reason.NOT_ENOUGH_NODES,
            metadata={"node_id": node_id, "eligible_nodes": str(len(others)),
                      "replicas": str(replicas)})
    return node


def mark_draining(cmap: admin_pb2.ClusterMap | None, node_id: str, replicas: int,
                  now: float | None = None) -> admin_pb2.ClusterMap | None:
    """The map with ``node_id`` DRAINING (None if it already is); raises as check_drain."""
    if cmap is None:
        find_node(None, node_id)
        return None
    if check_drain(cmap, node_id, replicas).state == admin_pb2.NODE_STATE_DRAINING:
        return None
    new = admin_pb2.ClusterMap()
    new.CopyFrom(cmap)
    find_node(new, node_id).state = admin_pb2.NODE_STATE_DRAINING
    new.epoch = cmap.epoch + 1
    stamp(new, time.time() if now is None else now)
    return new


def plan_rebalance(cmap: admin_pb2.ClusterMap | None,
                   replicas: int) -> admin_pb2.RebalanceResponse:
    """Where ``place()`` would put every group, from its current members."""
    if cmap is None:
        return admin_pb2.RebalanceResponse()
    before = assignments(cmap.groups, use_targets=False)
    nodes = eligible_nodes(cmap)
    after = place(before, nodes, replicas) if nodes else dict(before)
    slots = {g.group_id: slot_count(g) for g in cmap.groups}
    reply = admin_pb2.RebalanceResponse(
        imbalance_before_percent=imbalance_percent(before, nodes),
        imbalance_after_percent=imbalance_percent(after, nodes),
        slots_moved=sum(slots[g] for g in primary_moves(before, after)),
    )
    for gid in sorted(before):
        a, b = before[gid], after[gid]
        if not same(a, b):
            reply.moves.add(group_id=gid, slots=slots[gid], from_primary_node_id=a.primary,
                            to_primary_node_id=b.primary, from_replica_node_ids=a.replicas,
                            to_replica_node_ids=b.replicas)
    return reply


def apply_rebalance(cmap: admin_pb2.ClusterMap | None, plan: admin_pb2.RebalanceResponse,
                    now: float | None = None) -> admin_pb2.ClusterMap | None:
    """The map with the plan's moves as targets; ABORTED while another move runs."""
    if cmap is None or not plan.moves:
        return None
    moving = [g.group_id for g in cmap.groups if g.HasField("target")]
    if moving:
        raise MeshStatusError(
            grpc.StatusCode.ABORTED,
            f"{len(moving)} group(s) are still moving; retry when they are done",
            Reason.MIGRATION_IN_PROGRESS, metadata={"groups_moving": str(len(moving))})
    new = admin_pb2.ClusterMap()
    new.CopyFrom(cmap)
    by_id = {g.group_id: g for g in new.groups}
    for move in plan.moves:
        group = by_id[move.group_id]
        group.target.CopyFrom(admin_pb2.Placement(
            primary_node_id=move.to_primary_node_id,
            replica_node_ids=list(move.to_replica_node_ids)))
    new.epoch = cmap.epoch + 1
    stamp(new, time.time() if now is None else now)
    return new


def lost_groups(cmap: admin_pb2.ClusterMap | None) -> list[admin_pb2.Group]:
    """Groups with no primary: no copy of them is left."""
    return [g for g in cmap.groups if not g.primary_node_id] if cmap is not None else []


def recover_lost(cmap: admin_pb2.ClusterMap | None, replicas: int,
                 now: float | None = None) -> admin_pb2.ClusterMap | None:
    """The map with every lost group placed again, empty, at a new epoch (None if
    none is lost). Its replicas start catching up, as any new replica does: the
    primary vouches for them once they hold its (empty) state."""
    if cmap is None or not lost_groups(cmap):
        return None
    nodes = eligible_nodes(cmap)
    if not nodes:
        raise MeshStatusError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "no ACTIVE or JOINING node to place the lost groups on",
            Reason.NOT_ENOUGH_NODES, metadata={"eligible_nodes": "0"})
    new = admin_pb2.ClusterMap()
    new.CopyFrom(cmap)
    new.epoch = cmap.epoch + 1
    current = assignments(new.groups, use_targets=True)
    lost = lost_groups(new)
    current.update((g.group_id, Assignment("", ())) for g in lost)
    desired = place(current, nodes, replicas)
    for group in lost:
        where = desired[group.group_id]
        group.primary_node_id = where.primary
        group.epoch = group.origin_epoch = new.epoch
        del group.lost_copies[:]
        del group.replicas[:]
        group.replicas.extend(admin_pb2.Replica(node_id=n, in_sync=False, since_epoch=new.epoch)
                              for n in where.replicas)
        group.ClearField("target")
    stamp(new, time.time() if now is None else now)
    return new
