"""Who may send a replica commands, or copy a group's state: the map decides.

A peer credential proves that a caller is a member of the cluster; it does not
make it a group's primary. A replica applies a batch only from the node that
its copy of the cluster map (read from etcd) names as the group's primary, at
that very epoch: an epoch in a request is never trusted beyond the map. A
primary hands its state (`Snapshot`) only to the group's members.

Pure functions of the map, so that the rules are tested on their own.
"""

from __future__ import annotations

import enum

from common.clustermap import RoutingTable
from mesh.replication.v1 import replication_pb2 as rpb

__all__ = ["Verdict", "may_copy", "replicate_verdict"]


class Verdict(enum.Enum):
    APPLY = "apply"
    """The map names the sender as the group's primary at the batch's epoch."""
    STALE = "stale"
    """The map has a newer epoch: the sender was deposed. Answer STALE_EPOCH (it
    changes nothing here, and tells the sender to stop)."""
    WAIT = "wait"
    """The batch is from an epoch, or a group, this node's map has not shown
    yet: wait for the next map, then judge again."""
    DENY = "deny"
    """Someone other than the map's primary, or someone posing as another node."""


def replicate_verdict(table: RoutingTable | None, batch: rpb.CommandBatch,
                      sender: str) -> Verdict:
    """Whether ``sender`` (the node its credential names) may have ``batch`` applied."""
    if batch.primary_node_id != sender:
        return Verdict.DENY
    view = table.groups.get(batch.group_id) if table is not None else None
    if view is None:
        return Verdict.WAIT
    if batch.epoch < view.epoch:
        return Verdict.STALE
    if batch.epoch > view.epoch:
        return Verdict.WAIT
    return Verdict.APPLY if view.primary == sender else Verdict.DENY


def may_copy(table: RoutingTable | None, group_id: int, requester: str) -> bool:
    """Whether ``requester`` may take a snapshot of the group: it is one of its
    members (replicas being added are members too) in this node's map."""
    view = table.groups.get(group_id) if table is not None else None
    return view is not None and requester in view.members
