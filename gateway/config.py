"""The gateway's flags: each has a ``MESH_*`` variable, shared with the nodes where
the setting is the same thing (etcd, cluster, TLS to the nodes, the rate
limiter's Redis), ``MESH_GATEWAY_*`` where it is the gateway's own."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from common import event_loop, logs
from common.etcd import EtcdAccess
from common.process import add_etcd_flags, env, etcd_access
from common.tls import Tls
from gateway.limits import EdgeLimits
from gateway.websocket import WebSocketSettings

__all__ = ["GatewayConfig", "parse_args"]

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_MAX_BODY = 4 << 20


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = DEFAULT_LISTEN
    etcd: EtcdAccess | None = None
    cluster: str = "mesh"
    tls: Tls | None = None
    """TLS to the nodes (the CA to trust, a client certificate for mutual TLS)."""
    call_timeout: float = 5.0
    max_body_bytes: int = DEFAULT_MAX_BODY
    cors_origins: tuple[str, ...] = ()
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    sse_keepalive: float = 15.0
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    forwarded_allow_ips: str = ""
    log_level: str = "info"
    log_format: str = "text"
    event_loop: str = "auto"
    """auto, uvloop or asyncio (common.event_loop)."""


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gateway",
        description="The Mesh HTTP/JSON gateway: REST routes of the cache, lock, events, "
                    "scheduler and notify services, transcoded to gRPC calls to the owning "
                    "nodes, and their streams over Server-Sent Events and WebSocket.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--listen", default=env("GATEWAY_LISTEN", DEFAULT_LISTEN),
                   help="host:port of the HTTP server; port 0 picks a free one "
                        "(MESH_GATEWAY_LISTEN)")
    p.add_argument("--etcd", default=env("ETCD_ENDPOINTS", "127.0.0.1:2379"),
                   help="comma-separated etcd endpoints (MESH_ETCD_ENDPOINTS)")
    p.add_argument("--cluster", default=env("CLUSTER", "mesh"),
                   help="cluster name, the etcd key prefix (MESH_CLUSTER)")
    add_etcd_flags(p)
    p.add_argument("--tls-ca", default=env("TLS_CA", ""),
                   help="PEM CA of the nodes' certificates: TLS to the nodes (MESH_TLS_CA)")
    p.add_argument("--tls-cert", default=env("TLS_CERT", ""),
                   help="PEM client certificate for nodes requiring mutual TLS (MESH_TLS_CERT)")
    p.add_argument("--tls-key", default=env("TLS_KEY", ""),
                   help="PEM private key of --tls-cert (MESH_TLS_KEY)")
    p.add_argument("--call-timeout", type=_positive,
                   default=float(env("GATEWAY_CALL_TIMEOUT", "5")),
                   help="seconds a call may take, retries and redirects included; also how "
                        "long a stream's first message may take (MESH_GATEWAY_CALL_TIMEOUT)")
    p.add_argument("--max-body-bytes", type=int,
                   default=int(env("GATEWAY_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY))),
                   help="largest request body accepted; larger is 413 "
                        "(MESH_GATEWAY_MAX_BODY_BYTES)")
    p.add_argument("--cors-origins", default=env("GATEWAY_CORS_ORIGINS", ""),
                   help="comma-separated origins browsers may call from ('*': any); empty: "
                        "no CORS headers (MESH_GATEWAY_CORS_ORIGINS)")
    p.add_argument("--rate-limit-token", type=_not_negative,
                   default=float(env("GATEWAY_RATE_LIMIT_TOKEN", "0")),
                   help="requests/s per bearer token; 0: no limit "
                        "(MESH_GATEWAY_RATE_LIMIT_TOKEN)")
    p.add_argument("--rate-limit-ip", type=_not_negative,
                   default=float(env("GATEWAY_RATE_LIMIT_IP", "0")),
                   help="requests/s per client IP; 0: no limit (MESH_GATEWAY_RATE_LIMIT_IP)")
    p.add_argument("--rate-limit-burst", type=_not_negative,
                   default=float(env("GATEWAY_RATE_LIMIT_BURST", "0")),
                   help="requests a full bucket holds; 0: one second's worth "
                        "(MESH_GATEWAY_RATE_LIMIT_BURST)")
    p.add_argument("--rate-limit-redis", default=env("RATE_LIMIT_REDIS", ""),
                   help="redis://host:port/db: buckets shared by every gateway (and the same "
                        "Redis the nodes use); empty: per-process buckets "
                        "(MESH_RATE_LIMIT_REDIS)")
    p.add_argument("--rate-limit-fail", choices=("open", "closed"),
                   default=env("RATE_LIMIT_FAIL", "open"),
                   help="with Redis unreachable: let requests through (open) or answer 503 "
                        "(closed) (MESH_RATE_LIMIT_FAIL)")
    p.add_argument("--sse-keepalive", type=_positive,
                   default=float(env("GATEWAY_SSE_KEEPALIVE", "15")),
                   help="seconds of silence on an event stream before a ': keepalive' comment "
                        "(MESH_GATEWAY_SSE_KEEPALIVE)")
    p.add_argument("--ws-heartbeat", type=_positive,
                   default=float(env("GATEWAY_WS_HEARTBEAT", "15")),
                   help="seconds of silence on a WebSocket before a heartbeat frame "
                        "(MESH_GATEWAY_WS_HEARTBEAT)")
    p.add_argument("--ws-idle-timeout", type=_positive,
                   default=float(env("GATEWAY_WS_IDLE_TIMEOUT", "60")),
                   help="seconds a WebSocket with no subscription may stay silent before it "
                        "is closed (MESH_GATEWAY_WS_IDLE_TIMEOUT)")
    p.add_argument("--ws-max-subscriptions", type=int,
                   default=int(env("GATEWAY_WS_MAX_SUBSCRIPTIONS", "100")),
                   help="subscriptions one WebSocket may hold (MESH_GATEWAY_WS_MAX_SUBSCRIPTIONS)")
    p.add_argument("--ws-resume-timeout", type=_positive,
                   default=float(env("GATEWAY_WS_RESUME_TIMEOUT", "30")),
                   help="seconds a failed WebSocket subscription keeps trying to resume before "
                        "it reports an error (MESH_GATEWAY_WS_RESUME_TIMEOUT)")
    p.add_argument("--forwarded-allow-ips", default=env("GATEWAY_FORWARDED_ALLOW_IPS", ""),
                   help="comma-separated addresses of proxies whose X-Forwarded-For is "
                        "trusted for the client IP; empty: none "
                        "(MESH_GATEWAY_FORWARDED_ALLOW_IPS)")
    logs.add_log_flags(p)
    event_loop.add_event_loop_flag(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> GatewayConfig:
    p = parser()
    a = p.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        p.error(f"--listen {a.listen!r}: expected HOST:PORT (port 0: a free one)")
    if a.max_body_bytes < 1:
        p.error("--max-body-bytes must be at least 1")
    if a.ws_max_subscriptions < 1:
        p.error("--ws-max-subscriptions must be at least 1")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    tls = Tls.of(a.tls_cert, a.tls_key, a.tls_ca)
    return GatewayConfig(
        listen=a.listen, etcd=etcd_access(p, a), cluster=a.cluster, tls=tls,
        call_timeout=a.call_timeout, max_body_bytes=a.max_body_bytes,
        cors_origins=tuple(o.strip() for o in a.cors_origins.split(",") if o.strip()),
        limits=EdgeLimits(per_token=a.rate_limit_token, per_ip=a.rate_limit_ip,
                          burst=a.rate_limit_burst, redis_url=a.rate_limit_redis,
                          fail_open=a.rate_limit_fail == "open"),
        sse_keepalive=a.sse_keepalive,
        websocket=WebSocketSettings(heartbeat=a.ws_heartbeat, idle_timeout=a.ws_idle_timeout,
                                    max_subscriptions=a.ws_max_subscriptions,
                                    resume_timeout=a.ws_resume_timeout),
        forwarded_allow_ips=a.forwarded_allow_ips,
        log_level=a.log_level, log_format=a.log_format, event_loop=a.event_loop)
