"""Peer credentials: how nodes and coordinators prove to each other that they are
members of the cluster.

Every call on the internal plane (replication, forwarding between nodes,
coordinator-to-node calls) carries ``x-mesh-peer: v1:<kind>:<expires>:<mac>:<id>``:
the caller's id (a node id, or a coordinator id), whether it is a ``node`` or a
``coord``, and when the credential expires (Unix milliseconds), signed with
HMAC-SHA256 under a key derived from the cluster secret and the cluster name. A
credential lives one minute: one seen on the wire is worth nothing soon after,
and a key derived per cluster keeps a credential of one cluster out of another
that shares the secret.

The secret is a file every member reads (``--cluster-secret-file``,
``MESH_CLUSTER_SECRET_FILE``); ``meshctl up`` makes one. Whoever holds it can
sign as any member, so it is kept like a private key. Mutual TLS, where
configured, protects the connection as well; the signed credential is what
names the caller, which the replicas' checks need (a ``Replicate`` must come
from the node the map names as the group's primary).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "COORDINATOR",
    "LIFETIME",
    "NODE",
    "PEER_HEADER",
    "Peer",
    "PeerKey",
    "PeerRefused",
    "PeerSigner",
    "add_secret_flag",
    "generate_secret",
    "peer_key_for",
]

log = logging.getLogger(__name__)

PEER_HEADER = "x-mesh-peer"
NODE = "node"
COORDINATOR = "coord"
LIFETIME = 60.0
"""Seconds a credential is valid for."""
SKEW = 5.0
"""Seconds of clock difference between members forgiven."""
MIN_SECRET_BYTES = 16
_VERSION = "v1"
_MAX_ID = 200
_MAX_CREDENTIAL = 400


class PeerRefused(Exception):
    """A credential was missing, malformed, forged or expired; ``reason`` says which
    (``missing``, ``malformed``, ``forged``, ``expired``), for logs and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Peer:
    """Who signed a valid credential."""

    kind: str
    """``node`` or ``coord``."""
    id: str

    @property
    def is_node(self) -> bool:
        return self.kind == NODE

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"


def add_secret_flag(p: argparse.ArgumentParser) -> None:
    """``--cluster-secret-file`` (``MESH_CLUSTER_SECRET_FILE``), for every server process."""
    p.add_argument("--cluster-secret-file",
                   default=os.environ.get("MESH_CLUSTER_SECRET_FILE", ""),
                   help="file holding the cluster secret (at least 16 bytes; `meshctl "
                        "secret` makes one) that signs the credentials members show each "
                        "other on the internal plane; required when client authentication "
                        "is on; without it the internal plane is open "
                        "(MESH_CLUSTER_SECRET_FILE)")


def peer_key_for(p: argparse.ArgumentParser, secret_file: str, cluster: str,
                 client_auth: bool) -> PeerKey | None:
    """The key from ``--cluster-secret-file``, or None (open internal plane); exits
    through ``p.error`` when the file is unusable, or missing while clients must
    authenticate (an open internal plane would make client auth worthless)."""
    if not secret_file:
        if client_auth:
            p.error("client authentication is on (--auth-tokens / --auth-jwt-secret) but the "
                    "internal plane has no credential: give --cluster-secret-file "
                    "(MESH_CLUSTER_SECRET_FILE), the same file on every node and "
                    "coordinator of the cluster")
        return None
    try:
        return PeerKey.from_file(secret_file, cluster)
    except ValueError as exc:
        p.error(f"--cluster-secret-file: {exc}")


def generate_secret() -> str:
    """A new cluster secret (256 random bits, hex)."""
    return secrets.token_hex(32)


class PeerKey:
    """Signs and checks credentials for one cluster."""

    def __init__(self, secret: bytes, cluster: str) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes")
        # Derived rather than used as is: the same secret file serving two
        # clusters gives two unrelated keys.
        self._key = hmac.new(secret, b"mesh peer credential v1\0" + cluster.encode(),
                             hashlib.sha256).digest()
        # Checked credentials, kept until they expire: the check costs an HMAC,
        # and every forwarded call of a peer shows the same one for a minute.
        self._valid: dict[str, tuple[Peer, float]] = {}

    @classmethod
    def from_file(cls, path: str | Path, cluster: str) -> PeerKey:
        """The key from a secret file; ValueError naming the file if unusable."""
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the cluster secret file {path}: "
                             f"{exc.strerror or exc}") from None
        try:
            return cls(secret, cluster)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def sign(self, kind: str, peer_id: str, lifetime: float = LIFETIME,
             now: float | None = None) -> str:
        """A credential naming ``peer_id``, valid for ``lifetime`` seconds."""
        if kind not in (NODE, COORDINATOR):
            raise ValueError(f"unknown peer kind {kind!r}")
        expires = int(((now if now is not None else time.time()) + lifetime) * 1000)
        body = f"{_VERSION}:{kind}:{expires}"
        return f"{body}:{self._mac(f'{body}:{peer_id}')}:{peer_id}"

    def verify(self, credential: str, now: float | None = None) -> Peer:
        """The peer a credential names; raises PeerRefused."""
        now = now if now is not None else time.time()
        known = self._valid.get(credential)
        if known is not None and now < known[1]:
            return known[0]
        if len(credential) > _MAX_CREDENTIAL:
            raise PeerRefused("malformed", "the peer credential is malformed")
        parts = credential.split(":", 4)
        if len(parts) != 5 or parts[0] != _VERSION or parts[1] not in (NODE, COORDINATOR) \
                or not parts[2].isdigit() or not 0 < len(parts[4]) <= _MAX_ID:
            raise PeerRefused("malformed", "the peer credential is malformed")
        version, kind, expires_ms, mac, peer_id = parts
        if not hmac.compare_digest(mac, self._mac(f"{version}:{kind}:{expires_ms}:{peer_id}")):
            raise PeerRefused("forged", "the peer credential is not signed by this cluster")
        expires = int(expires_ms) / 1000
        if expires + SKEW <= now:
            raise PeerRefused("expired", "the peer credential has expired")
        if expires > now + LIFETIME + SKEW:
            # Signed by a member, but not short-lived: refuse it all the same.
            raise PeerRefused("malformed", "the peer credential lives too long")
        peer = Peer(kind, peer_id)
        if len(self._valid) > 1024:
            self._valid = {c: v for c, v in self._valid.items() if now < v[1]}
        self._valid[credential] = (peer, expires + SKEW)
        return peer

    def check(self, metadata: Mapping[str, str]) -> Peer:
        """The peer behind a call's metadata; raises PeerRefused."""
        credential = metadata.get(PEER_HEADER)
        if not credential:
            raise PeerRefused("missing", "this port serves cluster members only: "
                                         "no peer credential")
        return self.verify(credential)


class PeerSigner:
    """This process's own credential, renewed when half its life is gone (none at
    all when the internal plane is open: no cluster secret)."""

    def __init__(self, key: PeerKey | None, kind: str, peer_id: str) -> None:
        self._key = key
        self._kind = kind
        self._id = peer_id
        self._credential = ""
        self._renew_at = 0.0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata pair to send with an internal call."""
        if self._key is None:
            return ()
        now = time.time()
        if now >= self._renew_at:
            self._credential = self._key.sign(self._kind, self._id, now=now)
            self._renew_at = now + LIFETIME / 2
        return ((PEER_HEADER, self._credential),)
