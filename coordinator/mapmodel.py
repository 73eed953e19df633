"""Small helpers over ``admin_pb2.ClusterMap``: members, assignments, node counts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from common.clustermap import slot_count
from common.membership import NodeInfo
from coordinator.placement import Assignment
from mesh.admin.v1 import admin_pb2

SERVICE_KINDS: Mapping[str, admin_pb2.ServiceKind.ValueType] = {
    "cache": admin_pb2.SERVICE_KIND_CACHE,
    "lock": admin_pb2.SERVICE_KIND_LOCK,
    "events": admin_pb2.SERVICE_KIND_EVENTS,
    "scheduler": admin_pb2.SERVICE_KIND_SCHEDULER,
    "notify": admin_pb2.SERVICE_KIND_NOTIFY,
    "saga": admin_pb2.SERVICE_KIND_SAGA,
}
ELIGIBLE = (admin_pb2.NODE_STATE_JOINING, admin_pb2.NODE_STATE_ACTIVE)
"""Node states that may be given new roles."""


def members(group: admin_pb2.Group) -> Assignment:
    """The group's current members (catching-up replicas included)."""
    return Assignment(group.primary_node_id, tuple(r.node_id for r in group.replicas))


def target(group: admin_pb2.Group) -> Assignment | None:
    if not group.HasField("target"):
        return None
    return Assignment(group.target.primary_node_id, tuple(group.target.replica_node_ids))


def effective(group: admin_pb2.Group) -> Assignment:
    """Where the group is going: its target if it has one, else its members."""
    return target(group) or members(group)


def same(a: Assignment, b: Assignment) -> bool:
    """Same primary and same replica set (replica order does not matter)."""
    return a.primary == b.primary and sorted(a.replicas) == sorted(b.replicas)


def set_target(group: admin_pb2.Group, placement: Assignment | None) -> None:
    if placement is None:
        group.ClearField("target")
    else:
        group.target.CopyFrom(admin_pb2.Placement(
            primary_node_id=placement.primary, replica_node_ids=list(placement.replicas)))


def eligible_nodes(cmap: admin_pb2.ClusterMap) -> list[str]:
    return sorted(n.node_id for n in cmap.nodes if n.state in ELIGIBLE)


def holds_role(cmap: admin_pb2.ClusterMap, node_id: str) -> bool:
    return any(node_id in (g.primary_node_id, *(r.node_id for r in g.replicas))
               for g in cmap.groups)


def catching_up(cmap: admin_pb2.ClusterMap) -> set[str]:
    """Nodes holding at least one replica that is not in sync yet."""
    return {r.node_id for g in cmap.groups for r in g.replicas if not r.in_sync}


def under_replicated(cmap: admin_pb2.ClusterMap) -> list[int]:
    return [g.group_id for g in cmap.groups
            if sum(r.in_sync for r in g.replicas) < g.desired_replicas]


def new_node(info: NodeInfo, state: admin_pb2.NodeState.ValueType,
             now: float) -> admin_pb2.Node:
    node = admin_pb2.Node(node_id=info.node_id, state=state)
    refresh_node(node, info)
    node.join_time.FromNanoseconds(int(now * 1e9))
    return node


def refresh_node(node: admin_pb2.Node, info: NodeInfo) -> None:
    """Copy what a node says about itself (address, services, version)."""
    node.address = info.address
    node.peer_address = info.peer_address
    node.version = info.version
    node.incarnation = info.incarnation
    del node.services[:]
    node.services.extend(SERVICE_KINDS[s] for s in info.services if s in SERVICE_KINDS)


def fill_counts(cmap: admin_pb2.ClusterMap) -> None:
    """Recompute each node's slot and group counts from the groups."""
    by_id = {n.node_id: n for n in cmap.nodes}
    for node in cmap.nodes:
        node.primary_slots = node.replica_slots = 0
        del node.primary_group_ids[:]
        del node.replica_group_ids[:]
    for group in sorted(cmap.groups, key=lambda g: g.group_id):
        slots = slot_count(group)
        primary = by_id.get(group.primary_node_id)
        if primary is not None:
            primary.primary_slots += slots
            primary.primary_group_ids.append(group.group_id)
        for replica in group.replicas:
            holder = by_id.get(replica.node_id)
            if holder is not None:
                holder.replica_slots += slots
                holder.replica_group_ids.append(group.group_id)


def assignments(groups: Iterable[admin_pb2.Group], *, use_targets: bool) -> dict[int, Assignment]:
    """group_id -> members (or effective placement), for groups that have a primary."""
    pick = effective if use_targets else members
    return {g.group_id: pick(g) for g in groups if g.primary_node_id}


def stamp(cmap: admin_pb2.ClusterMap, now: float) -> None:
    cmap.update_time.FromNanoseconds(int(now * 1e9))
