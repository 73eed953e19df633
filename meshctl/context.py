"""What every meshctl command shares: the global settings and how a command runs.

The global options (``--etcd``, ``--cluster``, ``--timeout``, ``--output``, the
``--etcd-*`` TLS and credential flags, ``--log-*``) go before the subcommand,
and are accepted after it too (``meshctl status -o json``): `add_late_options`
gives every subcommand hidden copies that override the group's values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from clients import Mesh
from common.etcd import EtcdAccess, split_endpoint

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Settings:
    """The global options, as given before or after the subcommand."""

    etcd: str = "127.0.0.1:2379"
    cluster: str = "mesh"
    timeout: float = 5.0
    output: str = "text"
    etcd_cacert: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_user: str = ""
    etcd_password_file: str = ""
    log_level: str = "warning"
    log_format: str = "text"

    @property
    def json(self) -> bool:
        return self.output == "json"

    def access(self) -> EtcdAccess:
        """etcd's endpoints with TLS and credentials; a malformed one is a usage error
        now rather than a traceback deep in a client."""
        try:
            access = EtcdAccess.of(self.etcd, cacert=self.etcd_cacert, cert=self.etcd_cert,
                                   key=self.etcd_key, user=self.etcd_user,
                                   password_file=self.etcd_password_file)
            for endpoint in access.endpoints:
                split_endpoint(endpoint)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        return access

    def mesh(self) -> Mesh:
        return Mesh(etcd=self.access(), cluster=self.cluster, timeout=self.timeout)


def settings() -> Settings:
    """The current command's settings (made by the top-level group)."""
    found = click.get_current_context().find_object(Settings)
    assert found is not None, "meshctl commands run under the meshctl group"
    return found


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine; its return value is the exit code."""
    return asyncio.run(coro)


# (flag declarations, Settings attribute, click type) of the options that may also
# follow the subcommand.
LATE_OPTIONS: list[tuple[tuple[str, ...], str, Any]] = [
    (("--etcd",), "etcd", str),
    (("--cluster",), "cluster", str),
    (("--timeout",), "timeout", float),
    (("--output", "-o"), "output", click.Choice(["text", "json"])),
    (("--etcd-cacert",), "etcd_cacert", str),
    (("--etcd-cert",), "etcd_cert", str),
    (("--etcd-key",), "etcd_key", str),
    (("--etcd-user",), "etcd_user", str),
    (("--etcd-password-file",), "etcd_password_file", str),
    (("--log-level",), "log_level", str),
    (("--log-format",), "log_format", click.Choice(["text", "json"])),
]


def _override(attr: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            found = ctx.find_object(Settings)
            if found is not None:
                setattr(found, attr, value)
                if attr.startswith("log_"):
                    from meshctl.cli import configure_logs

                    configure_logs(found)
    return callback


def add_late_options(command: click.Command) -> None:
    """Give ``command`` and every subcommand under it hidden copies of the global
    options (unless the command defines the flag itself)."""
    taken = {opt for p in command.params for opt in getattr(p, "opts", [])}
    for decls, attr, kind in LATE_OPTIONS:
        if any(d in taken for d in decls):
            continue
        command.params.append(click.Option(
            list(decls), type=kind, default=None, hidden=True, expose_value=False,
            callback=_override(attr)))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_late_options(sub)
