"""Node bootstrap: build the gRPC server, register in etcd, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from common import event_loop
from common.addresses import Endpoint
from common.auth import Authenticator
from common.clock import SYSTEM_CLOCK, Clock
from common.clustermap import MapFollower
from common.etcd import client_for
from common.membership import NodeInfo, node_key
from common.metrics import Metrics
from common.peer import NODE, PeerSigner
from common.process import say
from common.tls import bind
from common.tracing import Tracing
from mesh.replication.v1 import replication_pb2_grpc
from nodes.config import NodeConfig
from nodes.forwarding import Forwarder
from nodes.identity import succeed
from nodes.metrics import SentCollector, node_snapshot
from nodes.planes import ClientPlaneGuard, PeerPlaneGuard
from nodes.plugin import Service
from nodes.ratelimit import limiter_for
from nodes.registration import Registration
from nodes.replication.journal import Journal
from nodes.replication.machine import MachineFactory
from nodes.replication.manager import Replication
from nodes.replication.sender import message_limit
from nodes.replication.service import ReplicationService
from nodes.rpc import add_service
from nodes.services import registry
from nodes.session import ENVELOPE_BYTES, Calls, Sessions
from nodes.session import SERVICE as SESSION_SERVICE
from nodes.stalls import Stalls
from nodes.ticker import Ticker

log = logging.getLogger(__name__)

VERSION = "0.1.0"

def grpc_options(config: NodeConfig, max_message_bytes: int = 0) -> list[tuple[str, int]]:
    """Channel options shared by the server (and mirrored by clients);
    ``max_message_bytes`` (default ``config.max_message_bytes``): the message limit."""
    limit = max_message_bytes or config.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        # An answer within the limit still fits once wrapped for a session.
        ("grpc.max_send_message_length", limit + ENVELOPE_BYTES),
        # Ping idle connections so a dead peer is noticed in seconds, not at the
        # next call; accept client pings as often as every 5 s.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


class Node:
    """A running node: its two servers, its services and its etcd registration.

    The client port (``server``) serves the public services, health and
    reflection; the peer port (``peer_server``) serves replication and calls
    forwarded by other nodes, to cluster members only (`nodes.planes`).
    """

    def __init__(self, config: NodeConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock  # the only time its services' state code reads
        self.tracing = Tracing(config.tracing, f"mesh-node {config.node_id}")
        self.metrics = Metrics(
            lambda: node_snapshot(self.replication, self.services.values(), self.limiter,
                                  self._stalls.reported if self._stalls is not None else ()))
        refused = Counter("mesh_peer_refused", "Calls refused on the internal plane, by "
                          "reason (a missing, malformed, forged or expired credential; a "
                          "sender the map does not allow)", ["reason"],
                          registry=self.metrics.registry)
        self.server = grpc.aio.server(
            options=grpc_options(config),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
            interceptors=[ClientPlaneGuard(), *self.tracing.server_interceptors()],
        )
        self.peer_server = grpc.aio.server(
            options=grpc_options(config, message_limit(config.max_message_bytes)),
            interceptors=[PeerPlaneGuard(config.peer_key,
                                         lambda reason: refused.labels(reason).inc()),
                          *self.tracing.server_interceptors()],
        )
        self.signer = PeerSigner(config.peer_key, NODE, config.node_id)
        self.health = health.aio.HealthServicer()
        self.calls = Calls()
        self.sessions = Sessions(self.calls, config.max_concurrent_rpcs)
        self.server.add_generic_rpc_handlers((self.sessions.handler(),))
        self.services: dict[str, Service] = {}
        self._ticker: Ticker | None = None
        self.port = 0
        self.address = ""
        self.peer_port = 0
        self.peer_address = ""
        self._registration: Registration | None = None
        self._info: NodeInfo | None = None
        self._stalls: Stalls | None = None
        self._etcd = client_for(config.etcd)
        self.drained = asyncio.Event()
        # Why the node stopped by itself, if it failed (its disk refused writes).
        self.failure: BaseException | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._factories: dict[int, MachineFactory] = {}
        self.auth = Authenticator.from_files(config.auth_tokens, config.auth_jwt_secret,
                                             config.auth_jwt)
        self.limiter = limiter_for(config.rate_limits, config.cluster)
        self.incarnation = uuid.uuid4().hex
        # The process this one follows on the data dir: its registration is ours.
        self._predecessor = succeed(Path(config.data_dir), self.incarnation) \
            if config.data_dir else ""
        # Durable services share one journal: their writes share its fsyncs.
        self.journal: Journal | None = None
        self._classes = registry(config.plugins)
        if any(self._classes[name].durable for name in config.services):
            self.journal = Journal(Path(config.data_dir) / "durable.sqlite3",
                                   on_fatal=self._fail)
        self._add_services()
        self.replication = Replication(
            config.node_id, "", self._factories, self._lease_valid_until, config.lease_ttl,
            interceptors=self.tracing.client_interceptors(), tls=config.tls,
            journal=self.journal, incarnation=self.incarnation, signer=self.signer,
            clock=clock, log_bytes=config.replication_log_bytes,
            max_message_bytes=message_limit(config.max_message_bytes))
        self.replication.on_drained = self.drained.set
        self.metrics.registry.register(SentCollector(self.replication.sent))
        self.map = MapFollower(self._etcd, config.cluster)
        self.map.on_change(self.replication.on_map)
        self._replication_service = ReplicationService(
            self.replication, config.peer_key, lambda reason: refused.labels(reason).inc())
        replication_pb2_grpc.add_ReplicationServiceServicer_to_server(
            self._replication_service, self.peer_server)

    def _lease_valid_until(self) -> float:
        return self._registration.valid_until if self._registration is not None else 0.0

    def _add_services(self) -> None:
        names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME, SESSION_SERVICE]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in self.config.services:
            service = self.services[name] = self._classes[name].create(
                self.config, self.journal, self.clock)
            self._factories[service.kind] = service.machine
            names.append(self._serve(service))
        self.service_names = names
        # Reflection lists what a client may call: the internal services are
        # not on this port, so they are not listed either.
        reflection.enable_server_reflection(names, self.server)

    def _serve(self, service: Service) -> str:
        """Serve a public service on both ports; returns its full name.

        On the client port, calls are authenticated and rate limited. On the
        peer port arrive calls another node forwards: they carry the caller's
        token, which is authenticated here again (tenancy is the owner's
        decision), but the forwarding node already took their rate-limit tokens.
        """
        descriptor = service.descriptor
        add_service(self.server, service, descriptor, self.metrics.rpc, self.auth, self.limiter,
                    calls=self.calls)
        add_service(self.peer_server, service, descriptor, self.metrics.rpc, self.auth, None)
        return str(descriptor.full_name)

    async def start(self) -> None:
        """Bind and serve, register in etcd, follow the map; healthy once a map is in."""
        config = self.config
        self.port = bind(self.server, config.listen, config.tls)
        if self.port == 0:
            raise RuntimeError(f"could not bind {config.listen}")
        self.peer_port = bind(self.peer_server, config.peer_listen, config.tls)
        if self.peer_port == 0:
            raise RuntimeError(f"could not bind the peer port {config.peer_listen}")
        self.address = Endpoint(config.listen, config.advertise).address(self.port)
        self.peer_address = Endpoint(config.peer_listen,
                                     config.peer_advertise).address(self.peer_port)
        self.replication.address = self.peer_address
        if config.peer_key is None:
            log.warning("the internal plane is open: no --cluster-secret-file, so anyone "
                        "who reaches the peer port %s can replicate to and read from this "
                        "node (fine for local development only)", self.peer_address)
        if self.journal is not None:
            self.journal.start()
            self.replication.load_durable()
        await self.peer_server.start()
        await self.server.start()
        if self.config.metrics_listen:
            self.metrics.serve(self.config.metrics_listen, self.config.metrics_advertise)
        forwarder = Forwarder(self.replication, self.signer)
        for service in self.services.values():
            service.start(self.replication, forwarder)
        self._ticker = Ticker(list(self.services.values()), self.replication, self.clock)
        self._ticker.start()
        # Ready means "can answer": with a cluster map, every call is served,
        # forwarded or redirected; without one, every call would be NO_MAP.
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        map_loaded = asyncio.Event()
        self.map.on_change(lambda _table: map_loaded.set())
        self._ready_task = asyncio.create_task(self._serving_when(map_loaded))

        self._info = info = NodeInfo(
            node_id=self.config.node_id, address=self.address,
            services=self.config.services, version=VERSION,
            pid=os.getpid(), started_at=time.time(), metrics=self.metrics.address,
            incarnation=self.incarnation, peer_address=self.peer_address,
            copies=tuple(sorted(self.replication.groups)),  # read back from disk
        )
        self._registration = Registration(
            self._etcd, node_key(self.config.cluster, self.config.node_id),
            info.to_json(), self.config.lease_ttl, before_valid=self.map.refresh,
            ours=self._ours, on_taken=self._fail,
        )
        await self._registration.start()
        await self.map.start()
        self._stalls = Stalls(lambda: self.replication.links, self._incarnations,
                              self._publish_stalled, config.replica_stall_timeout)
        self._stalls.start()

    def _incarnations(self) -> dict[str, str]:
        table = self.replication.table
        return table.incarnations if table is not None else {}

    async def _publish_stalled(self, stalled: tuple[str, ...]) -> bool:
        """Name ``stalled`` in this node's registration (`nodes.stalls`)."""
        if self._registration is None or self._info is None:
            return False
        self._info = replace(self._info, stalled=stalled)
        return await self._registration.update(self._info.to_json())

    async def _serving_when(self, map_loaded: asyncio.Event) -> None:
        """SERVING once a map is in, and for as long as the etcd lease is certainly
        held: cut off from etcd, the node cannot know the map, and says so."""
        await map_loaded.wait()
        serving: bool | None = None
        while True:
            now = self.replication.lease_valid()
            if now != serving:
                if serving is not None:
                    log.warning("etcd lease %s: health %s", "renewed" if now else "not renewed",
                                "SERVING" if now else "NOT_SERVING")
                status = (health_pb2.HealthCheckResponse.SERVING if now
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                for name in ["", *self.service_names]:
                    await self.health.set(name, status)
                serving = now
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Clean shutdown: NOT_SERVING, leave etcd at once, let in-flight calls finish."""
        if self._ready_task is not None:
            self._ready_task.cancel()
        await self.health.enter_graceful_shutdown()
        if self._stalls is not None:
            await self._stalls.close()
        if self._registration is not None:
            await self._registration.close()
        # Keep serving while clients learn (from etcd) that this node is gone:
        # calls they send meanwhile are answered instead of refused, and once
        # the server stops only calls already in flight remain, with the grace
        # period to finish.
        await asyncio.sleep(self.config.drain_delay)
        if self._ticker is not None:
            await self._ticker.close()
        for service in self.services.values():
            await service.close()
        # Long-lived streams (replication both ways, watches) would hold the
        # server's grace period for nothing: end them, then let calls finish.
        await self.map.close()
        await self.replication.close()
        self._replication_service.close()
        self.sessions.stop()
        await asyncio.gather(self.server.stop(self.config.shutdown_grace),
                             self.peer_server.stop(self.config.shutdown_grace))
        if self.journal is not None:
            await self.journal.close()
        if self.limiter is not None:
            await self.limiter.close()
        await self.metrics.close()
        await asyncio.to_thread(self.tracing.shutdown)
        with contextlib.suppress(Exception):
            await self._etcd.close()

    def _ours(self, registration: bytes) -> bool:
        """Whether a registration found in etcd is this node's: this process's or
        the one it follows on the data dir."""
        try:
            incarnation = NodeInfo.from_json(registration).incarnation
        except (ValueError, KeyError, TypeError):  # not a node's registration
            return False
        return incarnation in (self.incarnation, self._predecessor) and bool(incarnation)

    def _fail(self, exc: BaseException) -> None:
        """Stop (exit status 1): the journal cannot write (acknowledged writes are
        on disk, and nothing after the failed flush was acknowledged), or another
        process took this node's registration."""
        self.failure = exc
        self.drained.set()

    def ready_line(self) -> str:
        """The line printed on stdout once the node serves and is registered."""
        return "READY " + json.dumps(
            {"node_id": self.config.node_id, "address": self.address,
             "peer_address": self.peer_address, "pid": os.getpid(),
             "metrics": self.metrics.address}
        )


async def serve(config: NodeConfig, stop: asyncio.Event) -> None:
    """Run a node until ``stop`` is set."""
    node = Node(config)
    try:
        await node.start()
    except BaseException:
        # Stop whatever did start (the gRPC servers first of all): left for the
        # garbage collector after the event loop has closed, they fail noisily.
        await node.stop()
        raise
    say(node.ready_line())
    log.info("node %s serving %s on %s (%s event loop)", config.node_id,
             ",".join(config.services), node.address, event_loop.running())
    stopping = asyncio.ensure_future(stop.wait())
    drained = asyncio.ensure_future(node.drained.wait())
    await asyncio.wait({stopping, drained}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    drained.cancel()
    log.info("shutting down")
    await node.stop()
    log.info("stopped")
    if node.failure is not None:
        # Not a clean exit: supervisors (systemd's Restart=on-failure, Kubernetes)
        # and whoever reads the exit status must see that it failed.
        raise SystemExit(1)
