"""Coordinator settings: every flag also reads a ``MESH_*`` environment variable."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.addresses import Endpoint, host_of
from common.auth import JwtPolicy, add_auth_flags, jwt_policy
from common.clustermap import DEFAULT_GROUP_COUNT
from common.etcd import EtcdAccess
from common.peer import PeerKey, add_secret_flag, peer_key_for
from common.process import add_etcd_flags, add_server_flags, env, etcd_access
from common.slots import SLOT_COUNT
from common.tls import Tls


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything a coordinator needs to start."""

    listen: str = "127.0.0.1:0"
    advertise: str = ""
    etcd: EtcdAccess = field(default_factory=EtcdAccess)
    """etcd's endpoints, and the TLS settings and credentials to reach it."""
    cluster: str = "mesh"
    coordinator_id: str = ""
    lease_ttl: int = 5
    replicas: int = 1
    groups: int = DEFAULT_GROUP_COUNT
    min_nodes: int = 1
    reconcile_interval: float = 0.2
    settle: float = 0.5
    metrics_listen: str = "127.0.0.1:0"
    """Where /metrics is served (port 0: a free one); empty: not served."""
    metrics_advertise: str = ""
    """Host or host:port of /metrics registered for scrapers ("" = the listen host)."""
    tracing: str = "off"
    """Span export: off, console, otlp or file:DIR (common.tracing)."""
    tls: Tls | None = None
    """Certificates for TLS (None: plaintext)."""
    peer_key: PeerKey | None = None
    """Signs the credential its calls to nodes carry (from the cluster secret)."""
    auth_tokens: str = ""
    """Bearer tokens file, as for nodes; with auth_jwt_secret empty too: AdminService open."""
    auth_jwt_secret: str = ""
    """File holding the HS256 secret that signs JWT bearer tokens."""
    auth_jwt: JwtPolicy = field(default_factory=JwtPolicy)
    """Audience, issuer and longest lifetime a JWT must satisfy."""
    log_level: str = "info"
    log_format: str = "text"
    """text, or json: one object per line (common.logs)."""
    event_loop: str = "auto"
    """auto, uvloop or asyncio (common.event_loop)."""

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        return self.etcd.endpoints


def parse_args(argv: Sequence[str] | None = None) -> CoordinatorConfig:
    """Build a CoordinatorConfig from flags, falling back to MESH_* variables, then defaults."""
    d = CoordinatorConfig()
    p = argparse.ArgumentParser(prog="python -m coordinator",
                                description="Run a Mesh coordinator.")
    add_server_flags(p, listen=d.listen, etcd=d.etcd_endpoints, cluster=d.cluster,
                     what="coordinator")
    add_etcd_flags(p)
    p.add_argument("--coordinator-id", default=env("COORDINATOR_ID", ""),
                   help="this coordinator's id; default: coord-<random hex> "
                        "(MESH_COORDINATOR_ID)")
    p.add_argument("--lease-ttl", type=int, default=int(env("LEASE_TTL", str(d.lease_ttl))),
                   help="leadership lease, seconds: a dead leader is replaced after about "
                        "this long (MESH_LEASE_TTL)")
    p.add_argument("--replicas", type=int, default=int(env("REPLICAS", str(d.replicas))),
                   help="replicas per group besides the primary (MESH_REPLICAS)")
    p.add_argument("--groups", type=int, default=int(env("GROUPS", str(d.groups))),
                   help="replica groups the slot space is cut into; only used when the "
                        "first map is created (MESH_GROUPS)")
    p.add_argument("--min-nodes", type=int, default=int(env("MIN_NODES", str(d.min_nodes))),
                   help="nodes that must be registered before the first map is created; "
                        "0 counts as 1 (MESH_MIN_NODES)")
    add_auth_flags(p)
    add_secret_flag(p)
    a = p.parse_args(argv)
    # /metrics is on the host the admin port advertises, unless told otherwise.
    metrics_advertise = a.metrics_advertise or (host_of(a.advertise) if a.advertise else "")
    for endpoint, flags in ((Endpoint(a.listen, a.advertise), ("--listen", "--advertise")),
                            (Endpoint(a.metrics_listen or "127.0.0.1:0", metrics_advertise),
                             ("--metrics-listen", "--metrics-advertise"))):
        if (problem := endpoint.problem(*flags)) is not None:
            p.error(problem)
    if a.lease_ttl < 1:
        p.error("--lease-ttl must be at least 1 second")
    if a.replicas < 0:
        p.error("--replicas must be 0 or more")
    if not 1 <= a.groups <= SLOT_COUNT:
        p.error(f"--groups must be 1..{SLOT_COUNT}")
    if a.min_nodes < 0:
        p.error("--min-nodes must be 0 or more")
    return CoordinatorConfig(
        listen=a.listen,
        advertise=a.advertise,
        etcd=etcd_access(p, a),
        cluster=a.cluster,
        coordinator_id=a.coordinator_id or f"coord-{uuid.uuid4().hex[:8]}",
        lease_ttl=a.lease_ttl,
        replicas=a.replicas,
        groups=a.groups,
        min_nodes=max(a.min_nodes, 1),
        metrics_listen=a.metrics_listen,
        metrics_advertise=metrics_advertise,
        tracing=a.tracing,
        tls=_tls(p, a),
        log_level=a.log_level,
        log_format=a.log_format,
        event_loop=a.event_loop,
        auth_tokens=a.auth_tokens,
        auth_jwt_secret=a.auth_jwt_secret,
        auth_jwt=jwt_policy(p, a),
        peer_key=peer_key_for(p, a.cluster_secret_file, a.cluster,
                              client_auth=bool(a.auth_tokens or a.auth_jwt_secret)),
    )


def _tls(p: argparse.ArgumentParser, a: argparse.Namespace) -> Tls | None:
    try:
        return Tls.of(a.tls_cert, a.tls_key, a.tls_ca)
    except ValueError as exc:
        p.error(str(exc))
