"""mesh.admin.v1.AdminService, as served by every coordinator.

The leader answers every call; another coordinator answers Status itself and
everything else with FAILED_PRECONDITION reason NOT_LEADER, naming the leader.
Handlers only await: map reads come from memory, node calls and etcd calls
each carry a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import grpc

from common.clustermap import MapFollower, RoutingTable, slot_count
from common.errors import MeshStatusError, Reason, invalid_argument
from common.slots import SLOT_COUNT
from coordinator.election import Election
from coordinator.leader import LeaderDriver
from coordinator.mapmodel import holds_role, under_replicated
from coordinator.mapstore import Deposed
from coordinator.operations import (
    apply_rebalance,
    find_node,
    lost_groups,
    mark_draining,
    plan_rebalance,
    recover_lost,
)
from coordinator.positions import PositionProbe
from mesh.admin.v1 import admin_pb2

log = logging.getLogger(__name__)

LAG_TIMEOUT = 2.0
"""GetTopology waits at most this long for replica lag; the map comes without it after."""
FUTURE_GRACE = 2.0
"""How long WatchTopology waits for an epoch ahead of the leader's map to appear
(a map being written as the call came) before refusing it."""
DRAIN_WAIT_DEFAULT = 300.0
"""How long Drain(wait) waits when the call has no deadline."""
MUTATIONS = frozenset({"Drain", "Rebalance", "RecoverLostGroups"})
"""The methods that change the cluster: with authentication on, they need the admin
role; every other method (reads) takes any valid token."""


def _newer(table: RoutingTable, epoch: int) -> bool:
    return table.epoch > epoch


class AdminService:
    """The AdminService servicer (registered with nodes.rpc.add_service)."""

    def __init__(self, election: Election, follower: MapFollower, probe: PositionProbe,
                 replicas: int, driver: Callable[[], LeaderDriver | None],
                 etcd_health: Callable[[], Awaitable[admin_pb2.EtcdHealth]]) -> None:
        self._election = election
        self._follower = follower
        self._probe = probe
        self._replicas = replicas
        self._get_driver = driver
        self._etcd_health = etcd_health

    # -- leader check ---------------------------------------------------------------

    def _not_leader(self, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION,
                    why: str = "this coordinator does not lead") -> MeshStatusError:
        leader = self._election.leader
        if leader is not None and leader.coordinator_id == self._election.coordinator_id:
            leader = None  # our own term just ended
        return MeshStatusError(code, f"{why}; call the leader", Reason.NOT_LEADER, metadata={
            "leader_id": leader.coordinator_id if leader else "",
            "leader_address": leader.address if leader else ""})

    async def _driver(self, context: grpc.aio.ServicerContext) -> LeaderDriver:
        driver = self._get_driver()
        if driver is None or not self._election.is_leader:
            raise self._not_leader()
        if not driver.ready.is_set():  # just elected: membership and map being read
            remaining = context.time_remaining()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(driver.ready.wait(), min(remaining or 3.0, 3.0))
            if not driver.ready.is_set():
                raise self._not_leader(grpc.StatusCode.UNAVAILABLE, "leadership is starting")
        return driver

    # -- RPCs -----------------------------------------------------------------------------

    async def GetTopology(self, request: admin_pb2.GetTopologyRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.GetTopologyResponse:
        driver = await self._driver(context)
        cmap = admin_pb2.ClusterMap()
        if driver.current is not None:
            cmap.CopyFrom(driver.current)
        await self._add_lag(cmap)
        return admin_pb2.GetTopologyResponse(cluster_map=cmap)

    async def _add_lag(self, cmap: admin_pb2.ClusterMap) -> None:
        pairs = [(g.primary_node_id, g.group_id) for g in cmap.groups
                 if g.primary_node_id and g.replicas]
        addresses = {n.node_id: n.peer_address or n.address for n in cmap.nodes}
        try:
            positions, _ = await asyncio.wait_for(
                self._probe.gather(pairs, addresses), LAG_TIMEOUT)
        except TimeoutError:
            return
        for group in cmap.groups:
            report = positions.get((group.primary_node_id, group.group_id))
            if report is None:
                continue
            progress = {p.node_id: p for p in report.replicas}
            for replica in group.replicas:
                p = progress.get(replica.node_id)
                if p is not None:
                    replica.lag_commands = p.lag_commands
                    replica.lag.FromNanoseconds(int(p.lag_seconds * 1e9))

    async def WatchTopology(self, request: admin_pb2.WatchTopologyRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[admin_pb2.WatchTopologyResponse]:
        driver = await self._driver(context)
        last = request.after_epoch
        if last > (driver.current.epoch if driver.current is not None else 0):
            await self._refuse_future(last)
        while True:
            if not self._election.is_leader:
                raise self._not_leader(grpc.StatusCode.UNAVAILABLE, "leadership lost")
            await self._follower.wait_for(partial(_newer, epoch=last), timeout=0.5)
            table = self._follower.table
            if table is not None and table.epoch > last:
                last = table.epoch
                yield admin_pb2.WatchTopologyResponse(cluster_map=table.proto)

    async def _refuse_future(self, epoch: int) -> None:
        """Refuse a watch from an epoch this cluster never reached, after a moment
        for a map being written right now. A caller can only already have maps
        this cluster's leaders wrote: one ahead of them is another cluster's, or
        from before its etcd was reset, and waiting for a map past it would leave
        the stream silent for as long as the cluster takes to get there, if ever."""
        if await self._follower.wait_for(partial(_newer, epoch=epoch - 1), FUTURE_GRACE):
            return
        table = self._follower.table
        raise invalid_argument("after_epoch", (
            f"is ahead of this cluster's map (epoch {table.epoch if table else 0}): a map of "
            "another cluster, or of this one before its store was reset; watch from 0"))

    async def ListNodes(self, request: admin_pb2.ListNodesRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.ListNodesResponse:
        driver = await self._driver(context)
        nodes = driver.current.nodes if driver.current is not None else []
        return admin_pb2.ListNodesResponse(nodes=nodes)

    async def Drain(self, request: admin_pb2.DrainRequest,
                    context: grpc.aio.ServicerContext) -> admin_pb2.DrainResponse:
        node_id = request.node_id
        if not node_id:
            raise invalid_argument("node_id", "must not be empty")
        driver = await self._driver(context)
        before = find_node(driver.current, node_id)
        reply = admin_pb2.DrainResponse(primary_slots=before.primary_slots,
                                        replica_slots=before.replica_slots)
        try:
            new = await driver.update(lambda m: mark_draining(m, node_id, self._replicas))
        except Deposed as exc:
            raise self._not_leader(grpc.StatusCode.UNAVAILABLE, "leadership lost") from exc
        current = new or driver.current
        reply.epoch = current.epoch if current is not None else 0
        if new is not None:
            log.info("draining %s (map epoch %d)", node_id, new.epoch)
        reply.done = current is None or not holds_role(current, node_id)
        if request.wait and not reply.done:
            remaining = context.time_remaining()
            budget = DRAIN_WAIT_DEFAULT if remaining is None else max(remaining - 0.2, 0.0)
            reply.done = await driver.wait_for(lambda m: not holds_role(m, node_id), budget)
            if not reply.done:
                if not self._election.is_leader:
                    raise self._not_leader(grpc.StatusCode.UNAVAILABLE, "leadership lost")
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"{node_id} still holds roles; the drain goes on")
        return reply

    async def Rebalance(self, request: admin_pb2.RebalanceRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.RebalanceResponse:
        driver = await self._driver(context)
        if request.dry_run:
            return plan_rebalance(driver.current, self._replicas)
        planned: list[admin_pb2.RebalanceResponse] = []

        def change(cmap: admin_pb2.ClusterMap | None) -> admin_pb2.ClusterMap | None:
            planned[:] = [plan_rebalance(cmap, self._replicas)]
            return apply_rebalance(cmap, planned[0])

        try:
            new = await driver.update(change)
        except Deposed as exc:
            raise self._not_leader(grpc.StatusCode.UNAVAILABLE, "leadership lost") from exc
        reply = planned[0] if planned else admin_pb2.RebalanceResponse()
        reply.epoch = new.epoch if new is not None else 0
        return reply

    async def RecoverLostGroups(
        self, request: admin_pb2.RecoverLostGroupsRequest, context: grpc.aio.ServicerContext,
    ) -> admin_pb2.RecoverLostGroupsResponse:
        driver = await self._driver(context)
        lost: list[admin_pb2.Group] = []

        def change(cmap: admin_pb2.ClusterMap | None) -> admin_pb2.ClusterMap | None:
            lost[:] = lost_groups(cmap)
            return None if request.dry_run else recover_lost(cmap, self._replicas)

        try:
            new = await driver.update(change)
        except Deposed as exc:
            raise self._not_leader(grpc.StatusCode.UNAVAILABLE, "leadership lost") from exc
        if new is not None:
            log.warning("recreated %d lost group(s), empty, at map epoch %d: %s", len(lost),
                        new.epoch, ",".join(str(g.group_id) for g in lost))
        return admin_pb2.RecoverLostGroupsResponse(
            group_ids=[g.group_id for g in lost], slots=sum(slot_count(g) for g in lost),
            epoch=new.epoch if new is not None else 0)

    async def Status(self, request: admin_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> admin_pb2.StatusResponse:
        driver = self._get_driver()
        cmap = driver.current if driver is not None and self._election.is_leader else None
        if cmap is None and self._follower.table is not None:
            cmap = self._follower.table.proto
        cmap = cmap or admin_pb2.ClusterMap()
        leader = self._election.leader
        live = {n.node_id for n in cmap.nodes if n.state != admin_pb2.NODE_STATE_DOWN}
        return admin_pb2.StatusResponse(
            leader_id=leader.coordinator_id if leader else "",
            leader_address=leader.address if leader else "",
            coordinator_id=self._election.coordinator_id,
            etcd=await self._etcd_health(),
            epoch=cmap.epoch,
            nodes=len(cmap.nodes),
            active_nodes=sum(n.state == admin_pb2.NODE_STATE_ACTIVE for n in cmap.nodes),
            slots_total=SLOT_COUNT,
            slots_covered=sum(slot_count(g) for g in cmap.groups if g.primary_node_id in live),
            slots_migrating=sum(slot_count(g) for g in cmap.groups if g.HasField("target")),
            under_replicated_group_ids=under_replicated(cmap),
        )
