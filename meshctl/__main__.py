"""``meshctl``: run a local mesh and talk to one.

    meshctl up --nodes 3          etcd + a coordinator + N nodes on free ports; Ctrl-C stops all
    meshctl status                leader, map epoch, coverage; each node's health and cache size
    meshctl topology [--nodes]    the cluster map: groups, their slots, primary and replicas
    meshctl drain NODE [--no-wait]  move every role off a node, which then leaves
    meshctl recover [--dry-run]   give groups that lost every copy a new, EMPTY primary
    meshctl cache get KEY
    meshctl cache set KEY VALUE [--ttl SECONDS] [--if-absent] [--if-version N]
    meshctl cache del KEY
    meshctl lock describe NAME    holders (tokens, expiry), waiters, latest fencing token
    meshctl jobs stats QUEUE...   a queue's jobs by state; jobs dead QUEUE; jobs requeue
                                  QUEUE [JOB_ID...]; jobs get JOB_ID (see meshctl.jobs)
    meshctl secret FILE           write a new cluster secret (--cluster-secret-file), mode 0600

Every command but ``up`` finds the mesh through ``--etcd`` (comma-separated
endpoints; default ``$MESH_ETCD_ENDPOINTS``, else 127.0.0.1:2379) and ``--cluster`` (default
``$MESH_CLUSTER``, else ``mesh``; TLS and credentials to etcd from ``--etcd-cacert``,
``--etcd-cert``, ``--etcd-key``, ``--etcd-user``, ``--etcd-password-file`` or their
``MESH_ETCD_*`` variables), and sends ``$MESH_TOKEN`` (if set) as a bearer
token on every call to the coordinator and the nodes (drain and recover need an
admin token when the coordinator authenticates).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from clients import Mesh, MeshError, PermissionDeniedError, UnauthenticatedError
from common.etcd import EtcdAccessError
from common.peer import generate_secret
from common.process import add_etcd_flags, etcd_access
from meshctl.jobs import add_parser as add_jobs_parser
from meshctl.up import run_up


def _mesh(args: argparse.Namespace) -> Mesh:
    return Mesh(etcd=args.etcd_access, cluster=args.cluster, timeout=args.timeout)


async def _status(args: argparse.Namespace) -> int:
    from meshctl.admin import print_cluster
    from meshctl.status import print_status

    try:
        await print_cluster(args.etcd_access, args.cluster, args.timeout)
    except MeshError as exc:
        print(f"coordinator: {exc}")
    async with _mesh(args) as mesh:
        return await print_status(mesh)


async def _admin(args: argparse.Namespace) -> int:
    from meshctl.admin import drain, print_topology, recover

    if args.command == "topology":
        return await print_topology(args.etcd_access, args.cluster, args.timeout, args.nodes)
    if args.command == "recover":
        return await recover(args.etcd_access, args.cluster, args.dry_run, args.timeout)
    timeout = max(args.timeout, args.wait_timeout) if args.wait else args.timeout
    return await drain(args.etcd_access, args.cluster, args.node_id, args.wait, timeout)


async def _cache(args: argparse.Namespace) -> int:
    async with _mesh(args) as mesh:
        if args.cache_command == "get":
            entry = await mesh.cache.get_entry(args.key)
            if entry is None:
                print("(nil)")
                return 1
            sys.stdout.buffer.write(entry.value + b"\n")
            print(f"# version {entry.version}"
                  + (f", expires at {entry.expire_at:.3f}" if entry.expire_at else ""),
                  file=sys.stderr)
        elif args.cache_command == "set":
            version = await mesh.cache.set(
                args.key, args.value, ttl=args.ttl, only_if_absent=args.if_absent,
                only_if_version=args.if_version)
            print(f"OK version {version}")
        elif args.cache_command == "del":
            print("deleted" if await mesh.cache.delete(args.key) else "not found")
    return 0


async def _lock(args: argparse.Namespace) -> int:
    async with _mesh(args) as mesh:
        info = await mesh.locks.describe(args.name)
    now = time.time()
    print(f"lock {info.name!r}: {info.max_permits - info.available_permits} of "
          f"{info.max_permits} permits held, latest fencing token {info.fencing_token}")
    for h in info.holders:
        kind = "reader" if h.shared else "holder"
        print(f"  {kind}  {h.owner or '-':24} token {h.fencing_token:<20} "
              f"permits {h.permits}  expires in {h.expire_time - now:.1f}s  lease {h.lease_id}")
    for w in info.waiters:
        wants = "shared" if w.shared else f"permits {w.permits}"
        print(f"  waiter  {w.owner or '-':24} {wants}  "
              f"waiting {now - w.since:.1f}s, gives up in {w.give_up_time - now:.1f}s")
    return 0


async def _jobs(args: argparse.Namespace) -> int:
    from meshctl.jobs import run

    async with _mesh(args) as mesh:
        return await run(args, mesh)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshctl", description="Run and inspect a Mesh.")
    p.add_argument("--etcd", default=os.environ.get("MESH_ETCD_ENDPOINTS", "127.0.0.1:2379"),
                   help="comma-separated etcd endpoints, every member of the etcd cluster "
                        "(MESH_ETCD_ENDPOINTS)")
    p.add_argument("--cluster", default=os.environ.get("MESH_CLUSTER", "mesh"),
                   help="cluster name (MESH_CLUSTER)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline per call, seconds")
    add_etcd_flags(p)
    # The same options are accepted after the subcommand too (`meshctl up --cluster x`).
    common = argparse.ArgumentParser(add_help=False)
    for flag in ("--etcd", "--cluster", "--etcd-cacert", "--etcd-cert", "--etcd-key",
                 "--etcd-user", "--etcd-password-file"):
        common.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def command(parent: Any, name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, help=help, parents=[common])
        return parser

    up = command(sub, "up", "run a local mesh until Ctrl-C")
    up.add_argument("--nodes", type=int, default=3, help="how many nodes")
    up.add_argument("--etcd-port", type=int, default=2379,
                    help="etcd client port; a free one if taken (0 = always a free one)")
    up.add_argument("--etcd-members", type=int, default=1,
                    help="etcd cluster size; more than 1 starts that many members on free "
                         "ports (try losing one: any 2 of 3 keep the mesh going)")
    up.add_argument("--lease-ttl", type=int, default=5,
                    help="node and coordinator lease TTL, seconds")
    up.add_argument("--coordinators", type=int, default=1, help="how many coordinators")
    up.add_argument("--replicas", type=int, default=1, help="replicas per group")
    up.add_argument("--no-status", action="store_true", help="no live status line")

    command(sub, "status", "show the leader, map epoch, nodes, health and cache sizes")

    topology = command(sub, "topology", "show the cluster map")
    topology.add_argument("--nodes", action="store_true", help="only the per-node summary")

    drain = command(sub, "drain", "move every slot role off a node")
    drain.add_argument("node_id")
    drain.add_argument("--no-wait", dest="wait", action="store_false",
                       help="return once the drain is planned")
    drain.add_argument("--wait-timeout", type=float, default=120.0,
                       help="seconds to wait for the node to be empty")

    recover = command(sub, "recover", "recreate groups that lost every copy, empty")
    recover.add_argument("--dry-run", action="store_true", help="only list the lost groups")

    cache = command(sub, "cache", "cache calls")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    get = command(csub, "get", "print a key's value")
    get.add_argument("key")
    set_ = command(csub, "set", "write a key")
    set_.add_argument("key")
    set_.add_argument("value")
    set_.add_argument("--ttl", type=float, default=None, help="seconds")
    set_.add_argument("--if-absent", action="store_true")
    set_.add_argument("--if-version", type=int, default=0)
    delete = command(csub, "del", "delete a key")
    delete.add_argument("key")

    lock = command(sub, "lock", "lock calls")
    lsub = lock.add_subparsers(dest="lock_command", required=True)
    describe = command(lsub, "describe", "show a lock's holders and waiters")
    describe.add_argument("name")

    add_jobs_parser(sub, command)

    secret = command(sub, "secret", "write a new cluster secret for --cluster-secret-file")
    secret.add_argument("file", help="where to write it (refused if it exists)")
    return p


def _secret(path: str) -> int:
    """A new cluster secret in a file only its owner can read; never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"error: cannot create {path}: {exc.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as out:
        out.write(generate_secret() + "\n")
    print(f"wrote a new cluster secret to {path}: give the same file to every node and "
          f"coordinator (--cluster-secret-file), and keep it like a private key")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return run_up(args)
        if args.command == "secret":
            return _secret(args.file)
        # Every other command reads etcd, with these TLS settings and credentials.
        args.etcd_access = etcd_access(parser, args)
        if args.command == "status":
            return asyncio.run(_status(args))
        if args.command in ("topology", "drain", "recover"):
            return asyncio.run(_admin(args))
        if args.command == "lock":
            return asyncio.run(_lock(args))
        if args.command == "jobs":
            return asyncio.run(_jobs(args))
        return asyncio.run(_cache(args))
    except MeshError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if isinstance(exc, UnauthenticatedError | PermissionDeniedError):
            print("hint: set MESH_TOKEN to a valid bearer token (an admin one for drain "
                  "and recover)", file=sys.stderr)
        return 2
    except EtcdAccessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `meshctl topology | head`: the reader left; end quietly, like Unix tools.
        # (Not SIGPIPE's default action: that would also kill us on a socket.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
