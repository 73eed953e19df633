"""TLS and mutual TLS between clients, nodes and coordinators (certificates from files).

One set of flags (``--tls-cert``, ``--tls-key``, ``--tls-ca``; ``MESH_TLS_*``)
serves both sides of a process: its server presents ``cert``, and with ``ca``
it requires every caller to present a certificate signed by that CA (mutual
TLS); its own calls to other nodes present the same certificate and verify
theirs against ``ca``. Without ``--tls-cert`` everything is plaintext, which
is only meant for local development.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = ["Tls", "bind", "open_channel"]


@dataclass(frozen=True)
class Tls:
    """PEM files: this party's certificate and key, and the CA that signs its peers'."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def of(cls, cert: str = "", key: str = "", ca: str = "") -> Tls | None:
        """From flag values (empty: not given); None when TLS is off (no cert, no CA)."""
        if bool(cert) != bool(key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not cert and not ca:
            return None
        return cls(Path(cert) if cert else None, Path(key) if key else None,
                   Path(ca) if ca else None)

    @classmethod
    def from_env(cls) -> Tls | None:
        """From ``MESH_TLS_CERT``, ``MESH_TLS_KEY`` and ``MESH_TLS_CA`` (clients, meshctl)."""
        return cls.of(os.environ.get("MESH_TLS_CERT", ""), os.environ.get("MESH_TLS_KEY", ""),
                      os.environ.get("MESH_TLS_CA", ""))

    def _read(self, path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise ValueError("a server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self._read(self.ca), require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca), private_key=self._read(self.key),
            certificate_chain=self._read(self.cert))


def bind(server: grpc.aio.Server, listen: str, tls: Tls | None) -> int:
    """Bind ``server`` to ``listen`` (TLS if configured); the port, 0 if binding failed."""
    port: int = (server.add_insecure_port(listen) if tls is None
                 else server.add_secure_port(listen, tls.server_credentials()))
    return port


def open_channel(address: str, tls: Tls | None, options: Sequence[tuple[str, Any]] = (),
                 interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    """A channel to ``address``, over TLS if configured."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options),
                                         interceptors=list(interceptors) or None)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=list(options),
                                   interceptors=list(interceptors) or None)
