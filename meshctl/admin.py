"""``meshctl topology``, ``drain``, ``recover`` and the cluster lines of ``meshctl status``:
calls to the leading coordinator's AdminService, found through etcd."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from rich.console import Console
from rich.live import Live
from rich.text import Text

from clients.errors import DeadlineExceededError, UnavailableError, from_rpc_error
from coordinator.client import EtcdTarget, admin_client
from mesh.admin.v1 import admin_pb2
from meshctl.output import FAILED, NODE_STATES, OK, emit, topology_dict, topology_dot

T = TypeVar("T")


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
        lines.append(f"{n.node_id:<14} {n.address:<22} {NODE_STATES.get(n.state, '?'):<9} "
                     f"{n.primary_slots:>8} {n.replica_slots:>8}  "
                     f"{len(n.primary_group_ids)}/{len(n.replica_group_ids)}")
    return lines


def _show_map(cmap: admin_pb2.ClusterMap, output: str, nodes_only: bool, fmt: str) -> None:
    if output == "json":
        emit(topology_dict(cmap))
    elif fmt == "dot":
        print(topology_dot(cmap), flush=True)
    else:
        print("\n".join(format_topology(cmap, nodes_only)), flush=True)


async def get_topology(etcd: EtcdTarget, cluster: str, timeout: float) -> admin_pb2.ClusterMap:
    async with admin_client(etcd, cluster, timeout) as stub:
        reply = await _call(stub.GetTopology(admin_pb2.GetTopologyRequest(), timeout=timeout))
    cmap: admin_pb2.ClusterMap = reply.cluster_map
    return cmap


async def print_topology(etcd: EtcdTarget, cluster: str, timeout: float, nodes_only: bool,
                         output: str = "text", fmt: str = "text") -> int:
    _show_map(await get_topology(etcd, cluster, timeout), output, nodes_only, fmt)
    return OK


async def watch_topology(etcd: EtcdTarget, cluster: str, timeout: float, nodes_only: bool,
                         output: str = "text", fmt: str = "text") -> int:
    """Show each new map from WatchTopology until SIGINT/SIGTERM (OK); a stream that
    fails or ends raises UnavailableError (exit 3)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console = Console()
    # Redrawing in place only makes sense on a terminal; piped text gets every map.
    live = Live(console=console, auto_refresh=False, transient=False) \
        if output == "text" and fmt == "text" and console.is_terminal else None
    stopped = asyncio.ensure_future(stop.wait())
    try:
        async with admin_client(etcd, cluster, timeout) as stub:
            call = stub.WatchTopology(admin_pb2.WatchTopologyRequest())
            with live if live is not None else contextlib.nullcontext():
                while True:
                    nxt = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({nxt, stopped},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if stopped in done:
                        nxt.cancel()
                        call.cancel()
                        return OK
                    try:
                        message = nxt.result()
                    except grpc.aio.AioRpcError as exc:
                        error = from_rpc_error(exc)
                        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                          grpc.StatusCode.PERMISSION_DENIED):
                            raise error from exc
                        raise UnavailableError(f"the topology stream failed: {error}") from exc
                    if message is grpc.aio.EOF:
                        raise UnavailableError("the coordinator ended the topology stream")
                    assert isinstance(message, admin_pb2.WatchTopologyResponse)
                    cmap = message.cluster_map
                    if live is not None:
                        lines = format_topology(cmap, nodes_only)
                        lines.append(f"\n[{time.strftime('%H:%M:%S')}] live; Ctrl-C to stop")
                        live.update(Text("\n".join(lines), no_wrap=True, overflow="crop"),
                                    refresh=True)
                    else:
                        _show_map(cmap, output, nodes_only, fmt)
                        if output == "text" and fmt == "text":
                            print(flush=True)
    finally:
        stopped.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _left(cmap: admin_pb2.ClusterMap, node_id: str) -> tuple[int, int]:
    """Groups in which ``node_id`` is still the primary, and still a replica."""
    primary = sum(g.primary_node_id == node_id for g in cmap.groups)
    replica = sum(any(r.node_id == node_id for r in g.replicas) for g in cmap.groups)
    return primary, replica


async def drain(etcd: EtcdTarget, cluster: str, node_id: str, wait: bool, timeout: float,
                wait_timeout: float = 120.0, output: str = "text") -> int:
    """Ask for the drain, then (``wait``) follow the map until the node holds no role,
    printing each change of the groups left; FAILED after ``wait_timeout`` seconds."""
    async with admin_client(etcd, cluster, timeout) as stub:
        reply = await _call(stub.Drain(admin_pb2.DrainRequest(node_id=node_id, wait=False),
                                       timeout=timeout))
    if output == "json":
        emit({"event": "planned", "node_id": node_id, "epoch": reply.epoch,
              "primary_slots": reply.primary_slots, "replica_slots": reply.replica_slots,
              "done": reply.done})
    else:
        state = ("done: it holds no role" if reply.done else
                 "waiting for it to empty..." if wait else "in progress (see meshctl topology)")
        print(f"draining {node_id} since map epoch {reply.epoch}: {reply.primary_slots} "
              f"primary and {reply.replica_slots} replica slots to move; {state}", flush=True)
    if not wait or reply.done:
        return OK
    started = time.monotonic()
    deadline = started + wait_timeout
    last: tuple[int, int] | None = None
    epoch = reply.epoch
    # Polling GetTopology (rather than holding a WatchTopology stream) rides out a
    # coordinator failover: each poll finds the leader again.
    while True:
        try:
            cmap = await get_topology(etcd, cluster, min(timeout, 5.0))
        except (UnavailableError, DeadlineExceededError):
            cmap = None
        if cmap is not None:
            epoch = cmap.epoch
            left = _left(cmap, node_id)
            if left != last:
                last = left
                _progress(node_id, cmap.epoch, left, time.monotonic() - started, output)
            if left == (0, 0):
                return OK
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    primary, replica = last if last is not None else (-1, -1)
    if output == "json":
        emit({"event": "timeout", "node_id": node_id, "epoch": epoch,
              "primary_groups": primary, "replica_groups": replica,
              "elapsed": round(time.monotonic() - started, 3)})
    left_text = "unknown" if last is None else f"{primary + replica}"
    print(f"error: the drain of {node_id} did not finish in {wait_timeout:g}s "
          f"({left_text} group roles left); it goes on in the background: see meshctl "
          f"topology", file=sys.stderr)
    return FAILED


def _progress(node_id: str, epoch: int, left: tuple[int, int], elapsed: float,
              output: str) -> None:
    primary, replica = left
    done = left == (0, 0)
    if output == "json":
        emit({"event": "done" if done else "progress", "node_id": node_id, "epoch": epoch,
              "groups_left": primary + replica, "primary_groups": primary,
              "replica_groups": replica, "elapsed": round(elapsed, 3)})
    elif done:
        print(f"done: {node_id} holds no role (map epoch {epoch}, {elapsed:.1f}s)", flush=True)
    else:
        print(f"  {primary + replica} group roles left on {node_id} ({primary} primary, "
              f"{replica} replica) at map epoch {epoch}", flush=True)


async def recover(etcd: EtcdTarget, cluster: str, dry_run: bool, timeout: float,
                  output: str = "text") -> int:
    async with admin_client(etcd, cluster, timeout) as stub:
        reply = await _call(stub.RecoverLostGroups(
            admin_pb2.RecoverLostGroupsRequest(dry_run=dry_run), timeout=timeout))
    if output == "json":
        emit({"dry_run": dry_run, "group_ids": list(reply.group_ids), "slots": reply.slots,
              "epoch": reply.epoch})
        return OK
    if not reply.group_ids:
        print("no group is lost")
        return OK
    ids = ",".join(map(str, reply.group_ids))
    if dry_run:
        print(f"{len(reply.group_ids)} lost group(s) ({reply.slots} slots): {ids}")
    else:
        print(f"recreated {len(reply.group_ids)} lost group(s) ({reply.slots} slots), empty, "
              f"at map epoch {reply.epoch}: {ids}")
    return OK


async def cluster_status(etcd: EtcdTarget, cluster: str,
                         timeout: float) -> admin_pb2.StatusResponse:
    """The coordinator's Status: leader, map epoch, slot coverage."""
    async with admin_client(etcd, cluster, timeout) as stub:
        return await _call(stub.Status(admin_pb2.StatusRequest(), timeout=timeout))


def format_cluster(s: admin_pb2.StatusResponse) -> list[str]:
    under = ",".join(map(str, s.under_replicated_group_ids[:10])) or "none"
    if len(s.under_replicated_group_ids) > 10:
        under += f",... ({len(s.under_replicated_group_ids)} groups)"
    return [f"leader {s.leader_id} at {s.leader_address}; etcd "
            f"{'healthy' if s.etcd.healthy else 'UNHEALTHY'}",
            f"map epoch {s.epoch}: {s.active_nodes}/{s.nodes} nodes active, slots covered "
            f"{s.slots_covered}/{s.slots_total}, migrating {s.slots_migrating}, "
            f"under-replicated groups: {under}"]


async def print_cluster(etcd: EtcdTarget, cluster: str, timeout: float) -> None:
    """Leader, map epoch and slot coverage, from the coordinator's Status."""
    for line in format_cluster(await cluster_status(etcd, cluster, timeout)):
        print(line)

