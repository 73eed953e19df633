"""The ``meshctl`` command line (click): every command, its flags and its exit codes.

The commands' work lives beside it (`meshctl.admin`, `meshctl.jobs`, `meshctl.notify`,
`meshctl.saga`, `meshctl.status`, `meshctl.health`, `meshctl.node`, `meshctl.up`); this module
parses, runs and turns expected errors into one line on stderr and an exit code
(`meshctl.output`).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from clients import MeshError
from common import logs
from common.etcd import EtcdAccessError
from common.package import PREFIX
from common.peer import generate_secret
from meshctl import output
from meshctl.context import Settings, add_late_options, run, settings
from meshctl.jobs import jobs_group
from meshctl.notify import notify_group
from meshctl.saga import saga_group

EPILOG = """\b
Exit codes:
  0  ok
  1  operation failed: the cluster answered no (condition failed, not found,
     token refused, node NOT_SERVING, drain not finished in time)
  2  usage error (bad flag, bad address, invalid argument)
  3  cannot reach the cluster (etcd, coordinator or node unreachable, timeout)

\b
Every command also takes the global options after its name
(`meshctl status -o json`). Commands that read state print JSON with
--output json, one object per line (one per update for streams).
$MESH_TOKEN, if set, is sent as a bearer token on every call."""


def version() -> str:
    """The installed distribution's version; from a checkout, pyproject's + "checkout"
    (asked by package name, not metadata: a checkout's `make dist` leaves a
    meshkit.egg-info beside the code, which would answer for the checkout)."""
    if PREFIX:
        try:
            return importlib.metadata.version("meshkit")
        except importlib.metadata.PackageNotFoundError:
            return "0+unknown"
    try:
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return f"{tomllib.load(f)['project']['version']}+checkout"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"


def configure_logs(s: Settings) -> None:
    try:
        logs.configure(s.log_level, s.log_format)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--log-level") from None


CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True,
           "max_content_width": 100}


@click.group(context_settings=CONTEXT, epilog=EPILOG)
@click.option("--etcd", envvar="MESH_ETCD_ENDPOINTS", show_envvar=True,
              default="127.0.0.1:2379",
              help="Comma-separated etcd endpoints, every member of the etcd cluster.")
@click.option("--cluster", envvar="MESH_CLUSTER", show_envvar=True, default="mesh",
              help="Cluster name (the etcd key prefix).")
@click.option("--timeout", envvar="MESH_TIMEOUT", show_envvar=True, type=float, default=5.0,
              help="Deadline per call, seconds.")
@click.option("--output", "-o", envvar="MESH_OUTPUT", show_envvar=True,
              type=click.Choice(["text", "json"]), default="text",
              help="text for people; json: one object per line, stable keys.")
@click.option("--etcd-cacert", envvar="MESH_ETCD_CACERT", show_envvar=True,
              show_default=False, default="",
              help="PEM CA that signs etcd's certificate; turns TLS to etcd on.")
@click.option("--etcd-cert", envvar="MESH_ETCD_CERT", show_envvar=True,
              show_default=False, default="",
              help="PEM client certificate for etcd.")
@click.option("--etcd-key", envvar="MESH_ETCD_KEY", show_envvar=True,
              show_default=False, default="",
              help="PEM private key of --etcd-cert.")
@click.option("--etcd-user", envvar="MESH_ETCD_USER", show_envvar=True,
              show_default=False, default="",
              help="etcd user to authenticate as.")
@click.option("--etcd-password-file", envvar="MESH_ETCD_PASSWORD_FILE", show_envvar=True,
              show_default=False,
              default="", help="File whose first line is --etcd-user's password.")
@click.option("--log-level", envvar="MESH_LOG_LEVEL", show_envvar=True, default="warning",
              type=click.Choice(logs.LEVELS, case_sensitive=False),
              help="Least severe log messages shown (on stderr).")
@click.option("--log-format", envvar="MESH_LOG_FORMAT", show_envvar=True, default="text",
              type=click.Choice(logs.FORMATS), help="Log lines as text or JSON objects.")
@click.version_option(version=version(), prog_name="meshctl",
                      message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, /, **options: Any) -> None:
    """Run and inspect a Mesh."""
    ctx.obj = Settings(**options)
    configure_logs(ctx.obj)


# --- up, node start, secret -------------------------------------------------------------

@cli.command()
@click.option("--nodes", type=int, default=3, help="How many nodes.")
@click.option("--etcd-port", type=int, default=2379,
              help="etcd client port; a free one if taken (0 = always a free one).")
@click.option("--etcd-members", type=int, default=1,
              help="etcd cluster size; more than 1 starts that many members on free ports.")
@click.option("--lease-ttl", type=int, default=5, help="Node and coordinator lease TTL, s.")
@click.option("--coordinators", type=int, default=1, help="How many coordinators.")
@click.option("--replicas", type=int, default=1, help="Replicas per group.")
@click.option("--no-status", is_flag=True, help="No live status line.")
def up(**options: Any) -> int:
    """Run a local mesh (etcd, coordinators, nodes) until Ctrl-C."""
    from meshctl.up import UpOptions, run_up

    return run_up(UpOptions(cluster=settings().cluster, **options))


@cli.group()
def node() -> None:
    """Nodes of a local `meshctl up` mesh."""


@node.command("start")
@click.option("--node-id", default="", show_default=False,
              help="Its id (default: the next free node-N).")
@click.option("--up-state", type=click.Path(dir_okay=False), default=None,
              help="State file of the `meshctl up` to join (default: the one of --cluster).")
@click.argument("node_args", nargs=-1, type=click.UNPROCESSED)
def node_start(node_id: str, up_state: str | None, node_args: tuple[str, ...]) -> int:
    """Add a node to the running `meshctl up` of --cluster: same etcd, cluster, secret
    and settings. `meshctl up` starts it, so it runs (and stops) with the mesh; this
    returns once it serves and prints its id, address, pid and log. NODE_ARGS after
    `--` go to `python -m nodes` (e.g. `-- --services cache`)."""
    from meshctl.node import start_node

    return start_node(settings(), node_id, up_state, list(node_args))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
def secret(file: str) -> int:
    """Write a new cluster secret (for --cluster-secret-file), mode 0600; never
    overwrites."""
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        click.echo(f"error: cannot create {file}: {exc.strerror}", err=True)
        return output.FAILED
    with os.fdopen(fd, "w") as out:
        out.write(generate_secret() + "\n")
    click.echo(f"wrote a new cluster secret to {file}: give the same file to every node and "
               f"coordinator (--cluster-secret-file), and keep it like a private key")
    return output.OK


# --- cluster state ----------------------------------------------------------------------

@cli.command()
def status() -> int:
    """Leader, map epoch and coverage; each node's health, keys, leases and RPCs."""
    return run(_status(settings()))


async def _status(s: Settings) -> int:
    from meshctl.admin import cluster_status, format_cluster
    from meshctl.status import collect, format_status, node_dict

    access = s.access()
    cluster: Any = None
    problem = ""
    try:
        cluster = await cluster_status(access, s.cluster, s.timeout)
    except MeshError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    async with s.mesh() as mesh:
        rows = await collect(mesh)
    code = output.OK if rows and all(r.health == "SERVING" for r in rows) else output.FAILED
    if s.json:
        output.emit({"cluster": None if cluster is None else output.status_dict(cluster),
                     "coordinator_error": problem or None,
                     "nodes": [node_dict(r) for r in rows]})
        return code
    print("\n".join(format_cluster(cluster)) if cluster is not None
          else f"coordinator: {problem}")
    if not rows:
        print("no nodes registered")
    else:
        print("\n".join(format_status(rows)))
    return code


@cli.command()
@click.option("--nodes", "nodes_only", is_flag=True, help="Only the per-node summary.")
@click.option("--watch", "-w", is_flag=True,
              help="Follow the map live (WatchTopology) until Ctrl-C.")
@click.option("--format", "fmt", type=click.Choice(["text", "dot"]), default="text",
              help="Text table, or Graphviz dot of nodes and the groups they lead "
                   "(solid) and replicate (dashed).")
def topology(nodes_only: bool, watch: bool, fmt: str) -> int:
    """The cluster map: groups, their slots, primary and replicas; then the nodes."""
    from meshctl.admin import print_topology, watch_topology

    s = settings()
    show = watch_topology if watch else print_topology
    return run(show(s.access(), s.cluster, s.timeout, nodes_only, s.output, fmt))


@cli.command()
@click.argument("node_id")
@click.option("--no-wait", "wait", is_flag=True, flag_value=False, default=True,
              show_default=False,
              help="Return once the drain is planned.")
@click.option("--timeout", "--wait-timeout", "wait_timeout", type=float, default=120.0,
              help="Seconds to wait for the node to be empty before failing (exit 1); "
                   "the global --timeout, before `drain`, bounds each call.")
def drain(node_id: str, wait: bool, wait_timeout: float) -> int:
    """Move every role off a node (which then leaves), showing the groups left."""
    from meshctl.admin import drain as do_drain

    s = settings()
    return run(do_drain(s.access(), s.cluster, node_id, wait, s.timeout, wait_timeout,
                        s.output))


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only list the lost groups.")
def recover(dry_run: bool) -> int:
    """Give groups that lost every copy a new, EMPTY primary."""
    from meshctl.admin import recover as do_recover

    s = settings()
    return run(do_recover(s.access(), s.cluster, dry_run, s.timeout, s.output))


@cli.command()
@click.argument("address")
@click.option("--service", default="", show_default=False,
              help="Service to ask about, e.g. mesh.cache.v1.CacheService "
                   "(default: the server as a whole).")
@click.option("--tls-ca", envvar="MESH_TLS_CA", show_envvar=True,
              show_default=False, default="",
              help="PEM CA that signs the server's certificate; turns TLS on.")
@click.option("--tls-cert", envvar="MESH_TLS_CERT", show_envvar=True,
              show_default=False, default="",
              help="PEM client certificate (mutual TLS).")
@click.option("--tls-key", envvar="MESH_TLS_KEY", show_envvar=True,
              show_default=False, default="",
              help="PEM private key of --tls-cert.")
def health(address: str, service: str, tls_ca: str, tls_cert: str, tls_key: str) -> int:
    """Ask a node's or coordinator's gRPC health service at ADDRESS (host:port):
    exit 0 if SERVING, 1 if not, 3 if unreachable."""
    from common.tls import Tls
    from meshctl.health import check

    try:
        tls = Tls.of(tls_cert, tls_key, tls_ca)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    s = settings()
    return run(check(address, service, tls, s.timeout, s.output))


# --- services ---------------------------------------------------------------------------

@cli.group()
def cache() -> None:
    """Cache calls."""


@cache.command("get")
@click.argument("key")
def cache_get(key: str) -> int:
    """Print a key's value (exit 1 if absent)."""
    async def go() -> int:
        s = settings()
        async with s.mesh() as mesh:
            entry = await mesh.cache.get_entry(key)
        if s.json:
            output.emit({"key": key, "found": entry is not None,
                         "value": None if entry is None else entry.value,
                         "version": None if entry is None else entry.version,
                         "expire_at": None if entry is None else entry.expire_at})
        elif entry is None:
            print("(nil)")
        else:
            sys.stdout.buffer.write(entry.value + b"\n")
            print(f"# version {entry.version}"
                  + (f", expires at {entry.expire_at:.3f}" if entry.expire_at else ""),
                  file=sys.stderr)
        return output.OK if entry is not None else output.FAILED

    return run(go())


@cache.command("set")
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=float, default=None, help="Seconds to live.")
@click.option("--if-absent", is_flag=True, help="Only if the key does not exist.")
@click.option("--if-version", type=int, default=0, help="Only if the key is at this version.")
def cache_set(key: str, value: str, ttl: float | None, if_absent: bool, if_version: int) -> int:
    """Write a key."""
    async def go() -> int:
        s = settings()
        async with s.mesh() as mesh:
            written = await mesh.cache.set(key, value, ttl=ttl, only_if_absent=if_absent,
                                           only_if_version=if_version)
        if s.json:
            output.emit({"key": key, "version": written})
        else:
            print(f"OK version {written}")
        return output.OK

    return run(go())


@cache.command("del")
@click.argument("key")
def cache_del(key: str) -> int:
    """Delete a key."""
    async def go() -> int:
        s = settings()
        async with s.mesh() as mesh:
            deleted = await mesh.cache.delete(key)
        if s.json:
            output.emit({"key": key, "deleted": deleted})
        else:
            print("deleted" if deleted else "not found")
        return output.OK

    return run(go())


@cli.group()
def lock() -> None:
    """Lock calls."""


@lock.command("describe")
@click.argument("name")
def lock_describe(name: str) -> int:
    """A lock's holders (tokens, expiry), waiters and latest fencing token."""
    async def go() -> int:
        s = settings()
        async with s.mesh() as mesh:
            info = await mesh.locks.describe(name)
        if s.json:
            output.emit(info)
            return output.OK
        now = time.time()
        print(f"lock {info.name!r}: {info.max_permits - info.available_permits} of "
              f"{info.max_permits} permits held, latest fencing token {info.fencing_token}")
        for h in info.holders:
            kind = "reader" if h.shared else "holder"
            print(f"  {kind}  {h.owner or '-':24} token {h.fencing_token:<20} "
                  f"permits {h.permits}  expires in {h.expire_time - now:.1f}s  "
                  f"lease {h.lease_id}")
        for w in info.waiters:
            wants = "shared" if w.shared else f"permits {w.permits}"
            print(f"  waiter  {w.owner or '-':24} {wants}  "
                  f"waiting {now - w.since:.1f}s, gives up in {w.give_up_time - now:.1f}s")
        return output.OK

    return run(go())


cli.add_command(jobs_group)
cli.add_command(notify_group)
cli.add_command(saga_group)
add_late_options(cli)


def main(argv: Sequence[str] | None = None) -> int:
    """Run meshctl; returns the exit code (`meshctl.output`)."""
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="meshctl",
                          standalone_mode=False)
    except click.UsageError as exc:
        # One line, not click's usage block: the error is what the reader needs.
        where = exc.ctx.command_path if exc.ctx is not None else "meshctl"
        print(f"error: {exc.format_message()} (see `{where} --help`)", file=sys.stderr)
        return output.USAGE
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        return output.USAGE if exc.exit_code == 2 else output.FAILED
    except click.Abort:
        return 130
    except KeyboardInterrupt:
        return 130
    except (MeshError, EtcdAccessError) as exc:
        return output.fail(exc)
    except BrokenPipeError:
        # `meshctl topology | head`: the reader left; end quietly, like Unix tools.
        # (Not SIGPIPE's default action: that would also kill us on a socket.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return output.FAILED
    return result if isinstance(result, int) else output.OK
