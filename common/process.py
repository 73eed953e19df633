"""What every Mesh server process (node, coordinator) shares: its flags and its main.

Each flag falls back to a ``MESH_*`` environment variable, then to the default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

import aetcd.exceptions

from common import event_loop, logs
from common.etcd import EtcdAccess, EtcdAccessError

__all__ = ["StartupError", "add_etcd_flags", "add_server_flags", "env", "etcd_access",
           "etcd_endpoints", "run_until_signalled", "say"]


def say(line: str, stream: TextIO | None = None) -> None:
    """Write ``line`` (a READY line on stdout, an ``error:`` on stderr) in one
    write. `print` makes two, the text and its newline, and the log's writer
    thread (`common.logs`) could put a line between them where stdout and
    stderr share a file: the READY line would no longer parse."""
    out = stream if stream is not None else sys.stdout
    out.write(line + "\n")
    out.flush()


class StartupError(Exception):
    """Something to fix before the process can start (a damaged data file, say):
    `run_until_signalled` prints it as one line and exits 2, with no traceback."""


def env(name: str, default: str) -> str:
    """``$MESH_<name>``, or ``default``."""
    return os.environ.get(f"MESH_{name}", default)


def add_server_flags(p: argparse.ArgumentParser, *, listen: str, etcd: tuple[str, ...],
                     cluster: str, what: str) -> None:
    """--listen, --advertise, --etcd, --cluster, --tls-*, --tracing,
    --metrics-listen/--metrics-advertise, --log-level/--log-format and --event-loop,
    as every server process takes them."""
    p.add_argument("--listen", default=env("LISTEN", listen),
                   help="host:port to bind; port 0 picks a free one (MESH_LISTEN)")
    p.add_argument("--advertise", default=env("ADVERTISE", ""),
                   help=f"HOST or HOST:PORT others use to reach this {what} (a name or an "
                        "address; a bare host gets the bound port); default: the listen "
                        "address, which must then not be 0.0.0.0 or :: (MESH_ADVERTISE)")
    p.add_argument("--etcd", default=env("ETCD_ENDPOINTS", ",".join(etcd)),
                   help="comma-separated etcd endpoints (MESH_ETCD_ENDPOINTS)")
    p.add_argument("--cluster", default=env("CLUSTER", cluster),
                   help="cluster name, the etcd key prefix (MESH_CLUSTER)")
    p.add_argument("--tls-cert", default=env("TLS_CERT", ""),
                   help="PEM certificate this process presents; turns TLS on (MESH_TLS_CERT)")
    p.add_argument("--tls-key", default=env("TLS_KEY", ""),
                   help="PEM private key of --tls-cert (MESH_TLS_KEY)")
    p.add_argument("--tls-ca", default=env("TLS_CA", ""),
                   help="PEM CA that signs the peers' certificates; with it, callers must "
                        "present one (mutual TLS) (MESH_TLS_CA)")
    p.add_argument("--tracing", default=env("TRACING", "off"),
                   help="OpenTelemetry spans: off, console, otlp (OTEL_EXPORTER_OTLP_* "
                        "settings) or file:DIR (JSON lines) (MESH_TRACING)")
    p.add_argument("--metrics-listen", default=env("METRICS_LISTEN", "127.0.0.1:0"),
                   help="host:port for Prometheus /metrics; port 0 picks a free one, empty "
                        "turns it off (MESH_METRICS_LISTEN)")
    p.add_argument("--metrics-advertise", default=env("METRICS_ADVERTISE", ""),
                   help="HOST or HOST:PORT of /metrics as registered for scrapers; default: "
                        "the --advertise host, else the --metrics-listen address "
                        "(MESH_METRICS_ADVERTISE)")
    logs.add_log_flags(p)
    event_loop.add_event_loop_flag(p)


def add_etcd_flags(p: argparse.ArgumentParser) -> None:
    """--etcd-cacert, --etcd-cert, --etcd-key, --etcd-user and --etcd-password-file:
    TLS and credentials to etcd (beside --etcd, the endpoints). The password comes
    from a file, never a flag: command lines are visible to every local user."""
    p.add_argument("--etcd-cacert", default=env("ETCD_CACERT", ""),
                   help="PEM CA that signs etcd's certificate; turns TLS to etcd on "
                        "(MESH_ETCD_CACERT)")
    p.add_argument("--etcd-cert", default=env("ETCD_CERT", ""),
                   help="PEM client certificate for etcd, if it requires one (MESH_ETCD_CERT)")
    p.add_argument("--etcd-key", default=env("ETCD_KEY", ""),
                   help="PEM private key of --etcd-cert (MESH_ETCD_KEY)")
    p.add_argument("--etcd-user", default=env("ETCD_USER", ""),
                   help="etcd user to authenticate as (MESH_ETCD_USER)")
    p.add_argument("--etcd-password-file", default=env("ETCD_PASSWORD_FILE", ""),
                   help="file whose first line is --etcd-user's password "
                        "(MESH_ETCD_PASSWORD_FILE)")


def etcd_access(p: argparse.ArgumentParser, a: argparse.Namespace) -> EtcdAccess:
    """The EtcdAccess of ``--etcd`` and the `add_etcd_flags` flags; a bad combination
    (or an unreadable file) is a usage error."""
    try:
        return EtcdAccess.of(a.etcd, cacert=a.etcd_cacert, cert=a.etcd_cert, key=a.etcd_key,
                             user=a.etcd_user, password_file=a.etcd_password_file)
    except ValueError as exc:
        p.error(str(exc))


def etcd_endpoints(raw: str) -> tuple[str, ...]:
    """``"a:1, b:2"`` -> ``("a:1", "b:2")``."""
    return tuple(e.strip() for e in raw.split(",") if e.strip())


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]], *,
                        log_level: str = "info", log_format: str = "text",
                        loop: str = "auto") -> None:
    """Log to stderr (``log_format``: text or json) and run ``serve(stop)`` on the
    event loop ``loop`` (`common.event_loop`); SIGTERM or SIGINT sets ``stop``."""
    try:
        logs.configure(log_level, log_format, background=True)
        runs_on = event_loop.chosen(loop)
    except ValueError as exc:  # a bad MESH_* value: argparse checks only flags
        say(f"error: {exc}", sys.stderr)
        raise SystemExit(2) from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        event_loop.run(main(), runs_on)
    except Exception as exc:
        refused = _found(exc, (EtcdAccessError, StartupError))
        if refused is not None:
            # A setting to fix, not a bug: one line, no traceback.
            say(f"error: {refused}", sys.stderr)
            raise SystemExit(2) from None
        unreachable = _found(exc, _UNREACHABLE)
        if unreachable is None:
            raise
        # etcd down or elsewhere at start-up: as plain, and exit 3 as meshctl does.
        say(f"error: cannot reach etcd (check --etcd / MESH_ETCD_ENDPOINTS): "
            f"{' '.join(str(unreachable).split())}", sys.stderr)
        raise SystemExit(3) from None


_UNREACHABLE = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)


def _found(exc: BaseException, kinds: tuple[type[BaseException], ...]
           ) -> BaseException | None:
    """The error of ``kinds`` behind ``exc`` (itself, a cause or a group member), if any."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        if isinstance(e, BaseExceptionGroup):
            pending.extend(e.exceptions)
        pending.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None
