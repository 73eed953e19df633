"""Coordinator bootstrap: the gRPC server, the election, and the leader's work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import event_loop
from common.addresses import Endpoint
from common.auth import Authenticator
from common.clustermap import MapFollower, leader_key
from common.etcd import client_for
from common.metrics import Metrics, Snapshot
from common.peer import COORDINATOR, PeerSigner
from common.process import say
from common.tls import Tls, bind
from common.tracing import Tracing
from coordinator.admin import MUTATIONS, AdminService
from coordinator.config import CoordinatorConfig
from coordinator.election import Election, Leadership
from coordinator.etcdhealth import EtcdHealthCheck
from coordinator.leader import LeaderDriver
from coordinator.mapmodel import under_replicated
from coordinator.positions import PositionProbe
from mesh.admin.v1 import admin_pb2
from nodes.rpc import add_service

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]


def create_server(listen: str, interceptors: Sequence[Any] = (), tls: Tls | None = None,
                  ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A server with health and reflection (listing AdminService), bound to ``listen``.

    The caller adds the AdminService servicer before starting it.
    """
    server = grpc.aio.server(options=[
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),
    ], interceptors=list(interceptors) or None)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        [ADMIN_SERVICE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    port = bind(server, listen, tls)
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    return server, port, checker


class Coordinator:
    """One coordinator process: serves the admin API, campaigns, leads when elected."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self._etcd = client_for(config.etcd)
        self._probe = PositionProbe(
            PeerSigner(config.peer_key, COORDINATOR, config.coordinator_id), tls=config.tls)
        self._follower = MapFollower(self._etcd, config.cluster)
        self._health_check = EtcdHealthCheck(config.etcd, leader_key(config.cluster))
        self.driver: LeaderDriver | None = None
        self.tracing = Tracing(config.tracing, f"mesh-coordinator {config.coordinator_id}")
        self.server, self.port, self._health = create_server(
            config.listen, self.tracing.server_interceptors(), config.tls)
        self.address = Endpoint(config.listen, config.advertise).address(self.port)
        self.election = Election(self._etcd, config.cluster, config.coordinator_id,
                                 self.address, config.lease_ttl, self._lead)
        self.admin = AdminService(
            election=self.election, follower=self._follower, probe=self._probe,
            replicas=config.replicas, driver=lambda: self.driver,
            etcd_health=self._health_check.check)
        self.metrics = Metrics(self._snapshot)
        # With auth flags, reads take any valid token and mutations the admin role;
        # without, the admin API stays open (a local dev mesh).
        self.auth = Authenticator.from_files(config.auth_tokens, config.auth_jwt_secret,
                                             config.auth_jwt)
        add_service(self.server, self.admin, ADMIN_SERVICE, self.metrics.rpc, self.auth,
                    admin_methods=MUTATIONS)

    async def start(self) -> None:
        """Serve, read the map and the leader key (raising if etcd is unreachable), campaign."""
        await self.server.start()
        if self.config.metrics_listen:
            self.metrics.serve(self.config.metrics_listen, self.config.metrics_advertise)
        await self._follower.start()
        await self.election.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(ADMIN_SERVICE.full_name, health_pb2.HealthCheckResponse.SERVING)

    async def _lead(self, term: Leadership) -> None:
        driver = LeaderDriver(self._etcd, self.config, term, self._probe)
        self.driver = driver
        try:
            await driver.run()
        finally:
            if self.driver is driver:
                self.driver = None

    async def stop(self) -> None:
        """Resign at once (the lease is revoked, another coordinator takes over), then stop."""
        await self._health.enter_graceful_shutdown()
        await self.election.close()
        await self.server.stop(1.0)
        await self._follower.close()
        await self._probe.close()
        await self._health_check.close()
        await self.metrics.close()
        await asyncio.to_thread(self.tracing.shutdown)
        with contextlib.suppress(Exception):
            await self._etcd.close()

    def ready_line(self) -> str:
        """The line printed on stdout once the coordinator serves and campaigns."""
        return "READY " + json.dumps({"coordinator_id": self.config.coordinator_id,
                                      "address": self.address, "pid": os.getpid(),
                                      "metrics": self.metrics.address})

    def _snapshot(self) -> Snapshot:
        table = self._follower.table
        cmap = table.proto if table is not None else admin_pb2.ClusterMap()
        states = {name: 0.0 for name in ("JOINING", "ACTIVE", "DRAINING", "DOWN")}
        for node in cmap.nodes:
            name = admin_pb2.NodeState.Name(node.state).removeprefix("NODE_STATE_")
            states[name] = states.get(name, 0.0) + 1
        return Snapshot(gauges={
            "mesh_coordinator_leader": ("1 if this coordinator leads",
                                        {(): float(self.election.is_leader)}),
            "mesh_map_epoch": ("Cluster map epoch", {(): float(cmap.epoch)}),
            "mesh_nodes": ("Nodes in the map, by state",
                           {(("state", s),): n for s, n in states.items()}),
            "mesh_groups_lost": ("Groups with no copy left (see meshctl recover)",
                                 {(): float(sum(not g.primary_node_id for g in cmap.groups))}),
            "mesh_groups_under_replicated": ("Groups with fewer in-sync replicas than wanted",
                                             {(): float(len(under_replicated(cmap)))}),
            "mesh_groups_moving": ("Groups moving to a new placement",
                                   {(): float(sum(g.HasField("target") for g in cmap.groups))}),
        })


async def serve(config: CoordinatorConfig, stop: asyncio.Event) -> None:
    """Run a coordinator until ``stop`` is set."""
    coordinator = Coordinator(config)
    try:
        await coordinator.start()
    except BaseException:
        await coordinator.stop()
        raise
    say(coordinator.ready_line())
    log.info("coordinator %s serving on %s (%s event loop)", config.coordinator_id,
             coordinator.address, event_loop.running())
    await stop.wait()
    log.info("shutting down")
    await coordinator.stop()
    log.info("stopped")
