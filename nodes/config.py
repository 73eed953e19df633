"""Node settings: every flag also reads a ``MESH_*`` environment variable."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.addresses import Endpoint, host_of
from common.auth import JwtPolicy, add_auth_flags, jwt_policy
from common.etcd import EtcdAccess
from common.heartbeat import DEFAULT_INTERVAL as DEFAULT_HEARTBEAT
from common.peer import PeerKey, add_secret_flag, peer_key_for
from common.process import add_etcd_flags, add_server_flags, env, etcd_access
from common.tls import Tls
from nodes.identity import IdentityError, claim
from nodes.ratelimit import RateLimits

SERVICES = ("cache", "lock", "events", "scheduler", "notify", "saga")
DEFAULT_DATA_DIR = "mesh-data"
"""Relative to the working directory: a node started again where it was started
before finds its id and its data."""


@dataclass(frozen=True)
class CacheLimits:
    """Per-node cache limits (0 = unlimited)."""

    max_entries: int = 0
    max_bytes: int = 0
    max_value_bytes: int = 1 << 20
    eviction_policy: str = "lru"
    replication: str = "sync"
    """"sync": a write is answered once every in-sync replica holds it; "async":
    at once, replicas follow (faster, but a failover may lose recent writes)."""
    heartbeat_interval: float = DEFAULT_HEARTBEAT
    """Seconds a Watch stream that asked for heartbeats may stay idle before one is
    sent (0: none)."""


@dataclass(frozen=True)
class LockLimits:
    """Per-node lock settings (seconds)."""

    min_ttl: float = 1.0
    max_ttl: float = 3600.0
    default_ttl: float = 30.0
    max_waiters: int = 10_000
    """Queued Acquire calls per lock before new ones get RESOURCE_EXHAUSTED."""
    max_leases: int = 1_000_000
    """Live leases kept by the node (its groups, led or replicated) before a new
    Acquire gets RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class EventsLimits:
    """Per-node event store settings."""

    max_event_bytes: int = 1 << 20
    """data + metadata of one event."""
    max_append_bytes: int = 16 << 20
    """data + metadata of all the events of one Append."""
    max_append_events: int = 10_000
    max_subscriptions: int = 10_000
    """Subscribe streams served at once by the node."""
    subscriber_max_lag: int = 10_000
    """A live subscription this many log entries behind the committed head is
    switched back to catch-up (FellBehind)."""
    scavenge_interval: float = 5.0
    """Seconds between the primary's passes that remove events hidden by
    retention or deletion."""
    heartbeat_interval: float = DEFAULT_HEARTBEAT
    """Seconds a Subscribe stream may stay idle before a Heartbeat is sent (0: none)."""


@dataclass(frozen=True)
class NotifyLimits:
    """Per-node notification settings (durations in seconds)."""

    max_data_bytes: int = 256 << 10
    """Largest payload of one publication or inbox notification."""
    history_size: int = 100
    """Entries a channel keeps when its publisher gives no size."""
    history_ttl: float = 600.0
    """How long a channel keeps an entry when its publisher gives no ttl."""
    max_history_size: int = 10_000
    max_history_ttl: float = 7 * 86400.0
    inbox_size: int = 1000
    """Notifications an inbox keeps when the sender gives no size."""
    inbox_ttl: float = 7 * 86400.0
    """How long an inbox keeps a notification when the sender gives no ttl."""
    channel_lifetime: float = 86400.0
    """An idle channel whose history is empty is forgotten after this long (its
    next publication starts a new epoch)."""
    subscriber_buffer: int = 1000
    """Entries a subscription may be behind a channel's committed head before it
    is ended (SUBSCRIBER_TOO_SLOW); a request may ask for fewer."""
    max_subscriptions: int = 10_000
    """Subscribe streams served at once by the node."""
    trim_interval: float = 1.0
    """Seconds between the primary's passes that remove entries past their ttl."""
    heartbeat_interval: float = DEFAULT_HEARTBEAT
    """Seconds a Subscribe stream may stay idle before a Heartbeat is sent (0: none)."""


@dataclass(frozen=True)
class SagaLimits:
    """Per-node saga settings (durations in seconds)."""

    retention: float = 7 * 86400.0
    """How long a saga is kept once it reached a final state."""
    check_interval: float = 5.0
    """Seconds between the primary's looks at a running step's job when no
    worker reported it (a worker that died after Complete, a job that went dead
    after lost leases)."""
    publish_events: bool = True
    """Whether every transition is also appended to the event store (stream
    "saga-<id>"): needs nodes running the events service."""
    max_in_flight: int = 256
    """Scheduler and event store calls the driver makes at once."""
    compensation_attempts: int = 10
    """Attempts of a compensation's job when its definition gives none."""


@dataclass(frozen=True)
class SchedulerLimits:
    """Per-node job scheduler settings (durations in seconds)."""

    max_payload_bytes: int = 1 << 20
    """Largest job payload (and Complete result)."""
    max_queue_jobs: int = 1_000_000
    """Unfinished jobs (pending, scheduled, leased) per queue before Enqueue gets
    RESOURCE_EXHAUSTED."""
    default_max_attempts: int = 3
    default_timeout: float = 1800.0
    """Longest one attempt may run, when the job gives none."""
    default_lease: float = 30.0
    min_lease: float = 1.0
    max_lease: float = 3600.0
    default_retention: float = 86400.0
    """How long succeeded and cancelled jobs are kept, when the job gives none."""
    max_lease_losses: int = 5
    """A job whose lease expired this many times goes dead (expired leases do not
    spend its attempts)."""
    backoff_initial: float = 1.0
    backoff_max: float = 3600.0
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 0.2
    """Retry delays of jobs that give no backoff."""
    cron_catch_up: int = 10
    """Most ticks of one schedule fired late at once (missed while its group had no
    primary); older missed ticks are skipped."""
    sweep_interval: float = 1.0
    """Seconds between the primary's removals of finished jobs past retention."""
    request_retention: float = 86400.0
    """How long a queue remembers an Enqueue's request_id (a retry with it within
    this time gets the first job back instead of a second job)."""


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start."""

    listen: str = "127.0.0.1:0"
    advertise: str = ""
    peer_listen: str = ""
    """host:port of the peer port (internal services); default: the listen host, a
    free port."""
    peer_advertise: str = ""
    """Address other members use to reach the peer port; default: the advertised
    host (else the listen host) with the bound peer port."""
    peer_key: PeerKey | None = None
    """Signs and checks peer credentials (from the cluster secret); None: the
    internal plane is open."""
    etcd: EtcdAccess = field(default_factory=EtcdAccess)
    """etcd's endpoints, and the TLS settings and credentials to reach it."""
    cluster: str = "mesh"
    node_id: str = ""
    services: tuple[str, ...] = SERVICES
    plugins: tuple[str, ...] = ()
    """Services kept outside Mesh, as ``module:Class`` (`nodes.services.registry`)."""
    data_dir: str = ""
    lease_ttl: int = 5
    replica_stall_timeout: float = 5.0
    """Seconds a node may leave this node's replication messages (or heartbeats)
    unanswered before this node reports it to the coordinator, which replaces
    it in the groups led here (`nodes.stalls`)."""
    shutdown_grace: float = 10.0
    drain_delay: float = 1.0
    max_concurrent_rpcs: int = 1000
    max_message_bytes: int = 32 << 20
    replication_log_bytes: int = 64 << 20
    """Bytes of recent commands kept, all groups together, to bring a replica that
    fell behind up to date without a snapshot."""
    metrics_listen: str = "127.0.0.1:0"
    """Where /metrics is served (port 0: a free one); empty: not served."""
    metrics_advertise: str = ""
    """Host or host:port of /metrics registered for scrapers ("" = the listen host)."""
    tracing: str = "off"
    """Span export: off, console, otlp or file:DIR (common.tracing)."""
    tls: Tls | None = None
    """Certificates for TLS (None: plaintext)."""
    auth_tokens: str = ""
    """File of '<token> <tenant> [admin|client]' lines; with auth_jwt_secret empty too:
    no authentication."""
    auth_jwt_secret: str = ""
    """File holding the HS256 secret that signs JWT bearer tokens."""
    auth_jwt: JwtPolicy = field(default_factory=JwtPolicy)
    """Audience, issuer and longest lifetime a JWT must satisfy."""
    cache: CacheLimits = field(default_factory=CacheLimits)
    lock: LockLimits = field(default_factory=LockLimits)
    events: EventsLimits = field(default_factory=EventsLimits)
    scheduler: SchedulerLimits = field(default_factory=SchedulerLimits)
    notify: NotifyLimits = field(default_factory=NotifyLimits)
    saga: SagaLimits = field(default_factory=SagaLimits)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    log_level: str = "info"
    log_format: str = "text"
    """text, or json: one object per line (common.logs)."""
    event_loop: str = "auto"
    """auto, uvloop or asyncio (common.event_loop)."""

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        return self.etcd.endpoints


def parse_args(argv: Sequence[str] | None = None) -> NodeConfig:
    """Build a NodeConfig from flags, falling back to MESH_* variables, then defaults."""
    d = NodeConfig()
    p = argparse.ArgumentParser(prog="python -m nodes", description="Run a Mesh node.")
    add_server_flags(p, listen=d.listen, etcd=d.etcd_endpoints, cluster=d.cluster,
                     what="node")
    add_etcd_flags(p)
    p.add_argument("--peer-listen", default=env("PEER_LISTEN", ""),
                   help="host:port of the peer port, which serves replication and forwarded "
                        "calls to cluster members only; default: the --listen host, a free "
                        "port (MESH_PEER_LISTEN)")
    p.add_argument("--peer-advertise", default=env("PEER_ADVERTISE", ""),
                   help="address other members use to reach the peer port; default: the "
                        "--advertise host (else the --listen host) with the bound peer port "
                        "(MESH_PEER_ADVERTISE)")
    add_secret_flag(p)
    p.add_argument("--node-id", default=env("NODE_ID", ""),
                   help="stable node id; default: hostname + random suffix (MESH_NODE_ID)")
    p.add_argument("--services", default=env("SERVICES", ",".join(d.services)),
                   help=f"services to host, from {','.join(SERVICES)} (MESH_SERVICES)")
    p.add_argument("--data-dir", default=env("DATA_DIR", DEFAULT_DATA_DIR),
                   help="this node's directory: its id (generated once, kept here) and its "
                        "durable state; one node per directory (MESH_DATA_DIR; default "
                        f"./{DEFAULT_DATA_DIR})")
    p.add_argument("--lease-ttl", type=int, default=int(env("LEASE_TTL", str(d.lease_ttl))),
                   help="etcd registration lease, seconds (MESH_LEASE_TTL)")
    p.add_argument("--replica-stall-timeout", type=float,
                   default=float(env("REPLICA_STALL_TIMEOUT", str(d.replica_stall_timeout))),
                   help="seconds a replica may leave this node's replication unanswered "
                        "(a cut link, a hung disk) before the coordinator replaces it in the "
                        "groups this node leads, whose writes wait for it meanwhile "
                        "(MESH_REPLICA_STALL_TIMEOUT)")
    p.add_argument("--shutdown-grace", type=float,
                   default=float(env("SHUTDOWN_GRACE", str(d.shutdown_grace))),
                   help="seconds in-flight calls get to finish on SIGTERM (MESH_SHUTDOWN_GRACE)")
    p.add_argument("--drain-delay", type=float,
                   default=float(env("DRAIN_DELAY", str(d.drain_delay))),
                   help="seconds to keep serving after leaving etcd on SIGTERM, so clients "
                        "move away before the server stops (MESH_DRAIN_DELAY)")
    p.add_argument("--max-concurrent-rpcs", type=int,
                   default=int(env("MAX_CONCURRENT_RPCS", str(d.max_concurrent_rpcs))),
                   help="calls in flight before new ones get RESOURCE_EXHAUSTED; 0 = no limit "
                        "(MESH_MAX_CONCURRENT_RPCS)")
    p.add_argument("--replication-log-bytes", type=int,
                   default=int(env("REPLICATION_LOG_BYTES", str(d.replication_log_bytes))),
                   help="recent commands kept, all groups together, to catch a lagging "
                        "replica up without a snapshot (MESH_REPLICATION_LOG_BYTES)")
    c = d.cache
    p.add_argument("--cache-max-entries", type=int,
                   default=int(env("CACHE_MAX_ENTRIES", str(c.max_entries))),
                   help="0 = unlimited (MESH_CACHE_MAX_ENTRIES)")
    p.add_argument("--cache-max-bytes", type=int,
                   default=int(env("CACHE_MAX_BYTES", str(c.max_bytes))),
                   help="0 = unlimited (MESH_CACHE_MAX_BYTES)")
    p.add_argument("--cache-max-value-bytes", type=int,
                   default=int(env("CACHE_MAX_VALUE_BYTES", str(c.max_value_bytes))),
                   help="largest value accepted (MESH_CACHE_MAX_VALUE_BYTES)")
    p.add_argument("--cache-eviction", default=env("CACHE_EVICTION", c.eviction_policy),
                   choices=["lru", "lfu", "volatile-ttl", "noeviction"],
                   help="eviction policy (MESH_CACHE_EVICTION)")
    p.add_argument("--cache-replication", default=env("CACHE_REPLICATION", c.replication),
                   choices=["sync", "async"],
                   help="answer writes after the replicas hold them (sync) or at once "
                        "(async) (MESH_CACHE_REPLICATION)")
    add_auth_flags(p)
    lk = d.lock
    p.add_argument("--lock-min-ttl", type=float,
                   default=float(env("LOCK_MIN_TTL", str(lk.min_ttl))),
                   help="shortest lease ttl accepted, seconds (MESH_LOCK_MIN_TTL)")
    p.add_argument("--lock-max-ttl", type=float,
                   default=float(env("LOCK_MAX_TTL", str(lk.max_ttl))),
                   help="longest lease ttl accepted, seconds (MESH_LOCK_MAX_TTL)")
    p.add_argument("--lock-default-ttl", type=float,
                   default=float(env("LOCK_DEFAULT_TTL", str(lk.default_ttl))),
                   help="ttl of an Acquire that gives none, seconds (MESH_LOCK_DEFAULT_TTL)")
    p.add_argument("--lock-max-waiters", type=int,
                   default=int(env("LOCK_MAX_WAITERS", str(lk.max_waiters))),
                   help="queued Acquire calls per lock (MESH_LOCK_MAX_WAITERS)")
    p.add_argument("--lock-max-leases", type=int,
                   default=int(env("LOCK_MAX_LEASES", str(lk.max_leases))),
                   help="live leases kept by the node (MESH_LOCK_MAX_LEASES)")
    ev = d.events
    p.add_argument("--events-max-event-bytes", type=int,
                   default=int(env("EVENTS_MAX_EVENT_BYTES", str(ev.max_event_bytes))),
                   help="largest data + metadata of one event (MESH_EVENTS_MAX_EVENT_BYTES)")
    p.add_argument("--events-max-append-bytes", type=int,
                   default=int(env("EVENTS_MAX_APPEND_BYTES", str(ev.max_append_bytes))),
                   help="largest data + metadata of one Append "
                        "(MESH_EVENTS_MAX_APPEND_BYTES)")
    p.add_argument("--events-max-append-events", type=int,
                   default=int(env("EVENTS_MAX_APPEND_EVENTS", str(ev.max_append_events))),
                   help="most events in one Append (MESH_EVENTS_MAX_APPEND_EVENTS)")
    p.add_argument("--events-max-subscriptions", type=int,
                   default=int(env("EVENTS_MAX_SUBSCRIPTIONS", str(ev.max_subscriptions))),
                   help="Subscribe streams served at once (MESH_EVENTS_MAX_SUBSCRIPTIONS)")
    p.add_argument("--events-subscriber-max-lag", type=int,
                   default=int(env("EVENTS_SUBSCRIBER_MAX_LAG", str(ev.subscriber_max_lag))),
                   help="log entries a live subscription may fall behind before it goes "
                        "back to catch-up (MESH_EVENTS_SUBSCRIBER_MAX_LAG)")
    p.add_argument("--events-scavenge-interval", type=float,
                   default=float(env("EVENTS_SCAVENGE_INTERVAL", str(ev.scavenge_interval))),
                   help="seconds between removals of events hidden by retention or "
                        "deletion (MESH_EVENTS_SCAVENGE_INTERVAL)")
    p.add_argument("--stream-heartbeat-interval", type=float,
                   default=float(env("STREAM_HEARTBEAT_INTERVAL", str(ev.heartbeat_interval))),
                   help="seconds an event subscription or cache watch may stay idle before "
                        "the node sends a heartbeat (clients take a silent stream for dead "
                        "after 3); 0 = none (MESH_STREAM_HEARTBEAT_INTERVAL)")
    _scheduler_flags(p, d.scheduler)
    _notify_flags(p, d.notify)
    _saga_flags(p, d.saga)
    _rate_limit_flags(p)
    p.add_argument("--plugins", default=env("PLUGINS", ""),
                   help="more services to offer, as comma-separated module:Class names of "
                        "classes implementing nodes.plugin.Service (MESH_PLUGINS)")
    a = p.parse_args(argv)

    from nodes.services import registry  # here: the services import this module

    plugins = tuple(s.strip() for s in a.plugins.split(",") if s.strip())
    try:
        known = registry(plugins)
    except ValueError as exc:
        p.error(f"--plugins: {exc}")
    services = tuple(s.strip() for s in a.services.split(",") if s.strip())
    unknown = sorted(set(services) - set(known))
    if unknown:
        p.error(f"--services: unknown {', '.join(unknown)}")
    if a.lease_ttl < 1:
        p.error("--lease-ttl must be at least 1 second")
    if not a.replica_stall_timeout > 0:
        p.error("--replica-stall-timeout must be positive")
    if a.replication_log_bytes < 0:
        p.error("--replication-log-bytes must be 0 or more")
    if not 0 < a.lock_min_ttl <= a.lock_default_ttl <= a.lock_max_ttl:
        p.error("lock ttls: need 0 < --lock-min-ttl <= --lock-default-ttl <= --lock-max-ttl")
    if not 0 < a.events_max_event_bytes <= a.events_max_append_bytes:
        p.error("events: need 0 < --events-max-event-bytes <= --events-max-append-bytes")
    if a.events_max_append_events < 1 or a.events_subscriber_max_lag < 1 \
            or a.events_scavenge_interval <= 0:
        p.error("events: --events-max-append-events and --events-subscriber-max-lag must "
                "be at least 1, --events-scavenge-interval positive")
    if a.stream_heartbeat_interval < 0:
        p.error("--stream-heartbeat-interval must not be negative")
    scheduler = _scheduler_limits(p, a)
    notify = _notify_limits(p, a)
    saga = _saga_limits(p, a)
    rate_limits = _rate_limits(p, a)
    peer_listen = a.peer_listen or f"{host_of(a.listen)}:0"
    # The peer port and /metrics are on the host the client port advertises,
    # unless told otherwise.
    advertised_host = host_of(a.advertise) if a.advertise else ""
    peer_advertise = a.peer_advertise or advertised_host
    metrics_advertise = a.metrics_advertise or advertised_host
    for endpoint, flags in ((Endpoint(a.listen, a.advertise), ("--listen", "--advertise")),
                            (Endpoint(peer_listen, peer_advertise),
                             ("--peer-listen", "--peer-advertise")),
                            (Endpoint(a.metrics_listen or "127.0.0.1:0", metrics_advertise),
                             ("--metrics-listen", "--metrics-advertise"))):
        if (problem := endpoint.problem(*flags)) is not None:
            p.error(problem)
    try:
        node_id = claim(Path(a.data_dir), a.node_id)
    except IdentityError as exc:
        p.error(str(exc))
    peer_key = peer_key_for(p, a.cluster_secret_file, a.cluster,
                            client_auth=bool(a.auth_tokens or a.auth_jwt_secret))
    return NodeConfig(
        listen=a.listen,
        advertise=a.advertise,
        peer_listen=peer_listen,
        peer_advertise=peer_advertise,
        peer_key=peer_key,
        etcd=etcd_access(p, a),
        cluster=a.cluster,
        node_id=node_id,
        services=services, plugins=plugins,
        data_dir=a.data_dir,
        lease_ttl=a.lease_ttl,
        replica_stall_timeout=a.replica_stall_timeout,
        shutdown_grace=a.shutdown_grace,
        drain_delay=a.drain_delay,
        max_concurrent_rpcs=a.max_concurrent_rpcs,
        replication_log_bytes=a.replication_log_bytes,
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
        cache=CacheLimits(
            max_entries=a.cache_max_entries,
            max_bytes=a.cache_max_bytes,
            max_value_bytes=a.cache_max_value_bytes,
            eviction_policy=a.cache_eviction,
            replication=a.cache_replication,
            heartbeat_interval=a.stream_heartbeat_interval,
        ),
        lock=LockLimits(
            min_ttl=a.lock_min_ttl,
            max_ttl=a.lock_max_ttl,
            default_ttl=a.lock_default_ttl,
            max_waiters=a.lock_max_waiters,
            max_leases=a.lock_max_leases,
        ),
        events=EventsLimits(
            max_event_bytes=a.events_max_event_bytes,
            max_append_bytes=a.events_max_append_bytes,
            max_append_events=a.events_max_append_events,
            max_subscriptions=a.events_max_subscriptions,
            subscriber_max_lag=a.events_subscriber_max_lag,
            scavenge_interval=a.events_scavenge_interval,
            heartbeat_interval=a.stream_heartbeat_interval,
        ),
        scheduler=scheduler,
        notify=notify,
        saga=saga,
        rate_limits=rate_limits,
    )


def _rate_limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate-limit", type=float, default=float(env("RATE_LIMIT", "0")),
                   help="calls/s per tenant; 0 = no limit (MESH_RATE_LIMIT)")
    p.add_argument("--rate-limit-burst", type=float,
                   default=float(env("RATE_LIMIT_BURST", "0")),
                   help="calls a tenant may make at once; 0 = one second's worth "
                        "(MESH_RATE_LIMIT_BURST)")
    p.add_argument("--rate-limit-method", action="append", metavar="METHOD=RATE",
                   default=[m for m in env("RATE_LIMIT_METHODS", "").split(",") if m],
                   help="a method's own calls/s per tenant, e.g. Append=50; repeatable "
                        "(MESH_RATE_LIMIT_METHODS, comma-separated)")
    p.add_argument("--rate-limit-redis", default=env("RATE_LIMIT_REDIS", ""),
                   help="redis://host:port/db: buckets shared by every node (a global "
                        "limit); empty: each node limits what it serves (MESH_RATE_LIMIT_REDIS)")
    p.add_argument("--rate-limit-fail", choices=["open", "closed"],
                   default=env("RATE_LIMIT_FAIL", "open"),
                   help="with Redis unreachable: let calls through (open) or refuse them "
                        "(closed) (MESH_RATE_LIMIT_FAIL)")


def _rate_limits(p: argparse.ArgumentParser, a: argparse.Namespace) -> RateLimits:
    methods: dict[str, float] = {}
    for item in a.rate_limit_method:
        name, _, rate = item.partition("=")
        try:
            methods[name.strip()] = float(rate)
        except ValueError:
            p.error(f"--rate-limit-method {item!r}: expected METHOD=RATE, e.g. Append=50")
        if not name.strip() or methods[name.strip()] <= 0:
            p.error(f"--rate-limit-method {item!r}: expected METHOD=RATE with RATE > 0")
    if a.rate_limit < 0 or a.rate_limit_burst < 0:
        p.error("--rate-limit and --rate-limit-burst must not be negative")
    return RateLimits(rate=a.rate_limit, burst=a.rate_limit_burst, methods=methods,
                      redis_url=a.rate_limit_redis, fail_open=a.rate_limit_fail == "open")


def _scheduler_flags(p: argparse.ArgumentParser, sc: SchedulerLimits) -> None:
    def flag(name: str, kind: type[int] | type[float], default: float, help_: str) -> None:
        env_name = "SCHEDULER_" + name.upper().replace("-", "_")
        p.add_argument(f"--scheduler-{name}", type=kind,
                       default=kind(env(env_name, str(default))),
                       help=f"{help_} (MESH_{env_name})")

    flag("max-payload-bytes", int, sc.max_payload_bytes,
         "largest job payload and Complete result")
    flag("max-queue-jobs", int, sc.max_queue_jobs,
         "unfinished jobs per queue before Enqueue is refused (QUEUE_FULL)")
    flag("default-max-attempts", int, sc.default_max_attempts,
         "attempts of a job that gives no max_attempts")
    flag("default-timeout", float, sc.default_timeout,
         "seconds one attempt may run, for a job that gives no timeout")
    flag("default-lease", float, sc.default_lease,
         "lease of a Claim that gives none, seconds")
    flag("min-lease", float, sc.min_lease, "shortest lease accepted, seconds")
    flag("max-lease", float, sc.max_lease, "longest lease accepted, seconds")
    flag("default-retention", float, sc.default_retention,
         "seconds succeeded and cancelled jobs are kept, for a job that gives none")
    flag("max-lease-losses", int, sc.max_lease_losses,
         "expired leases after which a job goes dead")
    flag("backoff-initial", float, sc.backoff_initial,
         "default retry delay after the first failure, seconds")
    flag("backoff-max", float, sc.backoff_max, "default longest retry delay, seconds")
    flag("backoff-multiplier", float, sc.backoff_multiplier,
         "default growth of retry delays per failure")
    flag("backoff-jitter", float, sc.backoff_jitter,
         "default fraction of each retry delay randomly taken off (0 to 1)")
    flag("cron-catch-up", int, sc.cron_catch_up,
         "most missed ticks of a schedule fired late at once; older ones are skipped")
    flag("sweep-interval", float, sc.sweep_interval,
         "seconds between removals of finished jobs past retention")
    flag("request-retention", float, sc.request_retention,
         "seconds a queue remembers an Enqueue's request_id (a retry gets the same job)")


def _scheduler_limits(p: argparse.ArgumentParser, a: argparse.Namespace) -> SchedulerLimits:
    limits = SchedulerLimits(
        max_payload_bytes=a.scheduler_max_payload_bytes,
        max_queue_jobs=a.scheduler_max_queue_jobs,
        default_max_attempts=a.scheduler_default_max_attempts,
        default_timeout=a.scheduler_default_timeout,
        default_lease=a.scheduler_default_lease,
        min_lease=a.scheduler_min_lease,
        max_lease=a.scheduler_max_lease,
        default_retention=a.scheduler_default_retention,
        max_lease_losses=a.scheduler_max_lease_losses,
        backoff_initial=a.scheduler_backoff_initial,
        backoff_max=a.scheduler_backoff_max,
        backoff_multiplier=a.scheduler_backoff_multiplier,
        backoff_jitter=a.scheduler_backoff_jitter,
        cron_catch_up=a.scheduler_cron_catch_up,
        sweep_interval=a.scheduler_sweep_interval,
        request_retention=a.scheduler_request_retention,
    )
    if not 0 < limits.min_lease <= limits.default_lease <= limits.max_lease:
        p.error("scheduler leases: need 0 < --scheduler-min-lease <= "
                "--scheduler-default-lease <= --scheduler-max-lease")
    if not 0 < limits.backoff_initial <= limits.backoff_max \
            or limits.backoff_multiplier < 1 or not 0 <= limits.backoff_jitter <= 1:
        p.error("scheduler backoff: need 0 < --scheduler-backoff-initial <= "
                "--scheduler-backoff-max, --scheduler-backoff-multiplier >= 1 and "
                "--scheduler-backoff-jitter in [0, 1]")
    if min(limits.max_payload_bytes, limits.max_queue_jobs, limits.default_max_attempts,
           limits.max_lease_losses, limits.cron_catch_up) < 1 \
            or limits.default_max_attempts > 1000 or limits.default_timeout <= 0 \
            or limits.default_retention < 0 or limits.sweep_interval <= 0 \
            or not 0 < limits.request_retention <= 100 * 365 * 86400:
        p.error("scheduler: the byte, job, attempt, lease-loss and catch-up limits must be "
                "at least 1 (attempts at most 1000), the default timeout, sweep "
                "interval and request retention positive (the latter at most 100 years), "
                "the retention not negative")
    return limits


def _tls(p: argparse.ArgumentParser, a: argparse.Namespace) -> Tls | None:
    try:
        return Tls.of(a.tls_cert, a.tls_key, a.tls_ca)
    except ValueError as exc:
        p.error(str(exc))


def _notify_flags(p: argparse.ArgumentParser, nt: NotifyLimits) -> None:
    def flag(name: str, kind: type[int] | type[float], default: float, help_: str) -> None:
        env_name = "NOTIFY_" + name.upper().replace("-", "_")
        p.add_argument(f"--notify-{name}", type=kind,
                       default=kind(env(env_name, str(default))),
                       help=f"{help_} (MESH_{env_name})")

    flag("max-data-bytes", int, nt.max_data_bytes,
         "largest payload of a publication or inbox notification")
    flag("history-size", int, nt.history_size,
         "entries a channel keeps when its publisher gives no size")
    flag("history-ttl", float, nt.history_ttl,
         "seconds a channel keeps an entry when its publisher gives no ttl")
    flag("max-history-size", int, nt.max_history_size, "largest history size a publisher "
         "may give (also bounds inbox sizes)")
    flag("max-history-ttl", float, nt.max_history_ttl, "longest history ttl a publisher "
         "may give, seconds (also bounds inbox ttls)")
    flag("inbox-size", int, nt.inbox_size,
         "notifications an inbox keeps when the sender gives no size")
    flag("inbox-ttl", float, nt.inbox_ttl,
         "seconds an inbox keeps a notification when the sender gives no ttl")
    flag("channel-lifetime", float, nt.channel_lifetime,
         "seconds after which an idle channel with an empty history is forgotten")
    flag("subscriber-buffer", int, nt.subscriber_buffer,
         "entries a subscription may lag behind a channel before it is ended")
    flag("max-subscriptions", int, nt.max_subscriptions,
         "Subscribe streams served at once")
    flag("trim-interval", float, nt.trim_interval,
         "seconds between removals of entries past their ttl")


def _saga_flags(p: argparse.ArgumentParser, sg: SagaLimits) -> None:
    p.add_argument("--saga-retention", type=float,
                   default=float(env("SAGA_RETENTION", str(sg.retention))),
                   help="seconds a saga is kept once it ended (MESH_SAGA_RETENTION)")
    p.add_argument("--saga-check-interval", type=float,
                   default=float(env("SAGA_CHECK_INTERVAL", str(sg.check_interval))),
                   help="seconds between looks at a running step's job that no worker "
                        "reported (MESH_SAGA_CHECK_INTERVAL)")
    p.add_argument("--saga-events", choices=("on", "off"),
                   default=env("SAGA_EVENTS", "on" if sg.publish_events else "off"),
                   help="also append every saga transition to the event store, stream "
                        "saga-<id> (MESH_SAGA_EVENTS)")
    p.add_argument("--saga-compensation-attempts", type=int,
                   default=int(env("SAGA_COMPENSATION_ATTEMPTS", str(sg.compensation_attempts))),
                   help="attempts of a compensation job whose definition gives none "
                        "(MESH_SAGA_COMPENSATION_ATTEMPTS)")


def _saga_limits(p: argparse.ArgumentParser, a: argparse.Namespace) -> SagaLimits:
    if a.saga_retention <= 0 or a.saga_check_interval <= 0:
        p.error("saga: --saga-retention and --saga-check-interval must be positive")
    if not 1 <= a.saga_compensation_attempts <= 1000:
        p.error("saga: --saga-compensation-attempts must lie in 1..1000")
    return SagaLimits(retention=a.saga_retention, check_interval=a.saga_check_interval,
                      publish_events=a.saga_events == "on",
                      compensation_attempts=a.saga_compensation_attempts)


def _notify_limits(p: argparse.ArgumentParser, a: argparse.Namespace) -> NotifyLimits:
    limits = NotifyLimits(
        max_data_bytes=a.notify_max_data_bytes,
        history_size=a.notify_history_size,
        history_ttl=a.notify_history_ttl,
        max_history_size=a.notify_max_history_size,
        max_history_ttl=a.notify_max_history_ttl,
        inbox_size=a.notify_inbox_size,
        inbox_ttl=a.notify_inbox_ttl,
        channel_lifetime=a.notify_channel_lifetime,
        subscriber_buffer=a.notify_subscriber_buffer,
        max_subscriptions=a.notify_max_subscriptions,
        trim_interval=a.notify_trim_interval,
        heartbeat_interval=a.stream_heartbeat_interval,
    )
    if not 1 <= limits.history_size <= limits.max_history_size \
            or not 1 <= limits.inbox_size <= limits.max_history_size \
            or not 0 < limits.history_ttl <= limits.max_history_ttl \
            or not 0 < limits.inbox_ttl <= limits.max_history_ttl:
        p.error("notify: need 1 <= --notify-history-size and --notify-inbox-size <= "
                "--notify-max-history-size, and 0 < --notify-history-ttl and "
                "--notify-inbox-ttl <= --notify-max-history-ttl")
    if min(limits.max_data_bytes, limits.subscriber_buffer, limits.max_subscriptions) < 1 \
            or limits.trim_interval <= 0 or limits.channel_lifetime <= 0:
        p.error("notify: --notify-max-data-bytes, --notify-subscriber-buffer and "
                "--notify-max-subscriptions must be at least 1, --notify-trim-interval "
                "and --notify-channel-lifetime positive")
    return limits
