"""``meshctl topology``, ``drain``, ``recover`` and the cluster lines of ``meshctl status``:
calls to the leading coordinator's AdminService, found through etcd."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc

from clients.errors import from_rpc_error
from coordinator.client import EtcdTarget, admin_client
from mesh.admin.v1 import admin_pb2

T = TypeVar("T")

_STATES = {
    admin_pb2.NODE_STATE_JOINING: "JOINING",
    admin_pb2.NODE_STATE_ACTIVE: "ACTIVE",
    admin_pb2.NODE_STATE_DRAINING: "DRAINING",
    admin_pb2.NODE_STATE_DOWN: "DOWN",
}


async def _call(call: Awaitable[T]) -> T:
    """Await an admin call, turning a gRPC error into the client's MeshError."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc


def _ranges(group: admin_pb2.Group) -> str:
    return ",".join(f"{r.start}-{r.end}" for r in group.slot_ranges)


def _replica(replica: admin_pb2.Replica) -> str:
    text = replica.node_id + ("*" if replica.in_sync else "(catching up)")
    lag = replica.lag.seconds + replica.lag.nanos / 1e9
    if replica.lag_commands or lag:
        text += f"[lag {replica.lag_commands} cmd/{lag:.2f}s]"
    return text


def format_topology(cmap: admin_pb2.ClusterMap, nodes_only: bool = False) -> list[str]:
    """The map as text: one line per group, then one per node."""
    lines = [f"map epoch {cmap.epoch}, {len(cmap.groups)} groups, {len(cmap.nodes)} nodes "
             "(* = replica in sync)"]
    if not nodes_only:
        lines.append(f"{'GROUP':>5} {'SLOTS':<13} {'EPOCH':>5}  {'PRIMARY':<14} REPLICAS")
        for g in cmap.groups:
            replicas = " ".join(_replica(r) for r in g.replicas) or "-"
            line = (f"{g.group_id:>5} {_ranges(g):<13} {g.epoch:>5}  "
                    f"{g.primary_node_id or '(none)':<14} {replicas}")
            if g.HasField("target"):
                line += (f"  -> {g.target.primary_node_id} "
                         f"[{' '.join(g.target.replica_node_ids)}]")
            lines.append(line)
        lines.append("")
    lines.append(f"{'NODE':<14} {'ADDRESS':<22} {'STATE':<9} {'PRIMARY':>8} {'REPLICA':>8}"
                 f"  GROUPS (primary/replica)")
    for n in cmap.nodes:
        lines.append(f"{n.node_id:<14} {n.address:<22} {_STATES.get(n.state, '?'):<9} "
                     f"{n.primary_slots:>8} {n.replica_slots:>8}  "
                     f"{len(n.primary_group_ids)}/{len(n.replica_group_ids)}")
    return lines


async def print_topology(etcd: EtcdTarget, cluster: str, timeout: float, nodes_only: bool) -> int:
    async with admin_client(etcd, cluster, timeout) as stub:
        reply = await _call(stub.GetTopology(admin_pb2.GetTopologyRequest(), timeout=timeout))
    for line in format_topology(reply.cluster_map, nodes_only):
        print(line)
    return 0


async def drain(etcd: EtcdTarget, cluster: str, node_id: str, wait: bool, timeout: float) -> int:
    async with admin_client(etcd, cluster, timeout) as stub:
        reply = await _call(stub.Drain(admin_pb2.DrainRequest(node_id=node_id, wait=wait),
                                       timeout=timeout))
    state = "done: it holds no role" if reply.done else "in progress (see meshctl topology)"
    print(f"draining {node_id} since map epoch {reply.epoch}: {reply.primary_slots} primary "
          f"and {reply.replica_slots} replica slots to move; {state}")
    return 0


async def recover(etcd: EtcdTarget, cluster: str, dry_run: bool, timeout: float) -> int:
    async with admin_client(etcd, cluster, timeout) as stub:
        reply = await _call(stub.RecoverLostGroups(
            admin_pb2.RecoverLostGroupsRequest(dry_run=dry_run), timeout=timeout))
    if not reply.group_ids:
        print("no group is lost")
        return 0
    ids = ",".join(map(str, reply.group_ids))
    if dry_run:
        print(f"{len(reply.group_ids)} lost group(s) ({reply.slots} slots): {ids}")
    else:
        print(f"recreated {len(reply.group_ids)} lost group(s) ({reply.slots} slots), empty, "
              f"at map epoch {reply.epoch}: {ids}")
    return 0


async def print_cluster(etcd: EtcdTarget, cluster: str, timeout: float) -> None:
    """Leader, map epoch and slot coverage, from the coordinator's Status."""
    async with admin_client(etcd, cluster, timeout) as stub:
        s = await _call(stub.Status(admin_pb2.StatusRequest(), timeout=timeout))
    under = ",".join(map(str, s.under_replicated_group_ids[:10])) or "none"
    if len(s.under_replicated_group_ids) > 10:
        under += f",... ({len(s.under_replicated_group_ids)} groups)"
    print(f"leader {s.leader_id} at {s.leader_address}; etcd "
          f"{'healthy' if s.etcd.healthy else 'UNHEALTHY'}")
    print(f"map epoch {s.epoch}: {s.active_nodes}/{s.nodes} nodes active, slots covered "
          f"{s.slots_covered}/{s.slots_total}, migrating {s.slots_migrating}, "
          f"under-replicated groups: {under}")
