"""What meshctl prints and how it exits: exit codes, error lines, JSON output.

Every command prints text by default; ``--output json`` prints one JSON object
per line instead (a command that streams, such as ``topology --watch`` or
``drain``, prints one per update). The keys are those of `topology_dict`,
`status_dict` and `to_jsonable` (dataclass field names of the client), and are
part of meshctl's interface: keys may be added, never renamed or removed.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import sys
from collections.abc import Mapping
from typing import Any

from clients.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    MeshError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from common.etcd import EtcdAccessError
from mesh.admin.v1 import admin_pb2

OK = 0
"""The command did what it was asked."""
FAILED = 1
"""The cluster answered, and the answer is no (a condition failed, not found,
refused token, a node NOT_SERVING, a drain that did not finish in time)."""
USAGE = 2
"""The command line is wrong (unknown flag, bad address, invalid argument)."""
UNREACHABLE = 3
"""etcd, the coordinator or the node could not be reached in time."""

EXIT_CODES = {OK: "ok", FAILED: "operation failed (the cluster answered no)",
              USAGE: "usage error", UNREACHABLE: "cannot reach the cluster (etcd, "
              "coordinator or node unreachable, or a timeout)"}

NODE_STATES = {
    admin_pb2.NODE_STATE_JOINING: "JOINING",
    admin_pb2.NODE_STATE_ACTIVE: "ACTIVE",
    admin_pb2.NODE_STATE_DRAINING: "DRAINING",
    admin_pb2.NODE_STATE_DOWN: "DOWN",
}


def exit_code(exc: BaseException) -> int:
    """The exit code for an error that ended a command."""
    if isinstance(exc, UnavailableError | DeadlineExceededError | EtcdAccessError):
        return UNREACHABLE
    if isinstance(exc, InvalidArgumentError):
        return USAGE
    return FAILED


def error_line(exc: BaseException) -> str:
    """One line naming the error for stderr (no traceback: these are expected)."""
    name = f"{type(exc).__name__}: " if isinstance(exc, MeshError) else ""
    text = f"error: {name}{exc}"
    text = " ".join(text.split())  # gRPC details can hold newlines
    # The hint stays on the same line: one line per error, for people and for greps.
    if isinstance(exc, UnauthenticatedError | PermissionDeniedError):
        text += " (set MESH_TOKEN to a valid bearer token, an admin one for drain and recover)"
    elif exit_code(exc) == UNREACHABLE:
        text += " (is the mesh running? check --etcd / MESH_ETCD_ENDPOINTS and --cluster)"
    return text


def fail(exc: BaseException) -> int:
    print(error_line(exc), file=sys.stderr)
    return exit_code(exc)


def emit(obj: Any) -> None:
    """One JSON object on one line of stdout, flushed (a reader may be streaming)."""
    print(json.dumps(to_jsonable(obj), ensure_ascii=False), flush=True)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses as objects of their fields, enums by name, bytes as UTF-8 text
    (base64 in a ``{"base64": ...}`` object when not UTF-8)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, bytes):
        try:
            return obj.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(obj).decode()}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    return obj


def _seconds(d: Any) -> float:
    return float(d.seconds + d.nanos / 1e9)


def topology_dict(cmap: admin_pb2.ClusterMap) -> dict[str, Any]:
    """The cluster map as JSON: ``epoch``, ``update_time`` (Unix seconds),
    ``groups`` and ``nodes``."""
    groups = []
    for g in cmap.groups:
        groups.append({
            "group_id": g.group_id,
            "epoch": g.epoch,
            "slots": [[r.start, r.end] for r in g.slot_ranges],
            "primary": g.primary_node_id or None,
            "replicas": [{"node_id": r.node_id, "in_sync": r.in_sync,
                          "lag_commands": r.lag_commands, "lag_seconds": _seconds(r.lag)}
                         for r in g.replicas],
            "target": ({"primary": g.target.primary_node_id,
                        "replicas": list(g.target.replica_node_ids)}
                       if g.HasField("target") else None),
            "lost_copies": list(g.lost_copies),
        })
    nodes = [{
        "node_id": n.node_id,
        "address": n.address,
        "peer_address": n.peer_address,
        "state": NODE_STATES.get(n.state, "UNKNOWN"),
        "version": n.version,
        "primary_slots": n.primary_slots,
        "replica_slots": n.replica_slots,
        "primary_groups": list(n.primary_group_ids),
        "replica_groups": list(n.replica_group_ids),
    } for n in cmap.nodes]
    return {"epoch": cmap.epoch, "update_time": _seconds(cmap.update_time),
            "groups": groups, "nodes": nodes}


def status_dict(status: admin_pb2.StatusResponse) -> dict[str, Any]:
    """The coordinator's Status as JSON (the ``cluster`` key of ``status -o json``)."""
    return {
        "leader_id": status.leader_id,
        "leader_address": status.leader_address,
        "etcd_healthy": status.etcd.healthy,
        "epoch": status.epoch,
        "nodes": status.nodes,
        "active_nodes": status.active_nodes,
        "slots_total": status.slots_total,
        "slots_covered": status.slots_covered,
        "slots_migrating": status.slots_migrating,
        "under_replicated_group_ids": list(status.under_replicated_group_ids),
    }


def _q(text: str) -> str:
    """A dot string literal (``\\n`` inside stays dot's line break)."""
    return '"' + text.replace('"', '\\"') + '"'


def topology_dot(cmap: admin_pb2.ClusterMap) -> str:
    """Graphviz dot: nodes as boxes, groups as ellipses; a solid edge from the primary's
    node, a dashed one from each in-sync replica's, dotted while it catches up."""
    lines = ["digraph mesh {", "  rankdir=LR;", f"  label={_q(f'map epoch {cmap.epoch}')};",
             "  node [shape=box];"]
    for n in cmap.nodes:
        label = n.node_id + "\\n" + NODE_STATES.get(n.state, "UNKNOWN")
        lines.append(f"  {_q(n.node_id)} [label={_q(label)}];")
    for g in cmap.groups:
        gid = _q(f"group-{g.group_id}")
        slots = ",".join(f"{r.start}-{r.end}" for r in g.slot_ranges)
        label = f"group {g.group_id}" + "\\n" + slots
        lines.append(f"  {gid} [shape=ellipse, label={_q(label)}];")
        if g.primary_node_id:
            lines.append(f"  {_q(g.primary_node_id)} -> {gid};")
        for r in g.replicas:
            style = "dashed" if r.in_sync else "dotted"
            lines.append(f"  {_q(r.node_id)} -> {gid} [style={style}];")
    lines.append("}")
    return "\n".join(lines)
