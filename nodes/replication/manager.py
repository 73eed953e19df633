"""This node's part in every replica group, driven by the cluster map.

`Replication` follows the map: it creates the groups the node is a member of,
makes it primary (at the group's epoch) or replica as the map says, opens the
replication streams a primary needs, and drops groups that left. Services ask
it which group serves a slot (`resolve`), which is also where a primary that
could not renew its etcd lease stops accepting requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from common.clock import SYSTEM_CLOCK, Clock
from common.clustermap import GroupView, RoutingTable
from common.errors import MeshStatusError, Reason
from common.peer import NODE, PeerSigner
from common.tls import Tls, open_channel
from mesh.admin.v1 import admin_pb2
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from nodes.replication.log import DEFAULT_BUDGET, LogBudget
from nodes.replication.machine import MachineFactory, StateMachine
from nodes.replication.sender import PeerLink, ReplicaTracker, SendCounts, message_limit

__all__ = ["Redirect", "Replication"]

log = logging.getLogger(__name__)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Options of the channels to other nodes' peer ports (``max_message_bytes``:
    the peer plane's message limit, `sender.message_limit`)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *_CHANNEL_OPTIONS,
    ]


_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


@dataclass(frozen=True, slots=True)
class Redirect:
    """The slot's group is led by another node."""

    slot: int
    group_id: int
    epoch: int
    owner_node_id: str
    owner_address: str
    """Its client port (for callers redirected there)."""
    owner_peer_address: str
    """Its peer port (for calls forwarded there)."""


def unavailable(reason: Reason, message: str, **metadata: str) -> MeshStatusError:
    return MeshStatusError(grpc.StatusCode.UNAVAILABLE, message, reason, metadata)


class Replication:
    """Every group this node holds, kept in line with the cluster map."""

    def __init__(
        self, node_id: str, address: str, factories: Mapping[int, MachineFactory],
        lease_valid_until: Callable[[], float], lease_ttl: float,
        interceptors: Sequence[Any] = (), tls: Tls | None = None,
        journal: Journal | None = None, incarnation: str = "",
        signer: PeerSigner | None = None, clock: Clock = SYSTEM_CLOCK,
        log_bytes: int = DEFAULT_BUDGET, max_message_bytes: int = message_limit(32 << 20),
    ) -> None:
        """``max_message_bytes``: the peer plane's message limit (`message_limit` of
        the largest client request)."""
        self.node_id = node_id
        self._channel_options = channel_options(max_message_bytes)
        # Every group's command log draws on this one budget.
        self._log_budget = LogBudget(log_bytes)
        self._clock = clock  # the groups' (they stamp the commands they issue)
        # Signs its calls to other nodes' peer ports (none: an open plane).
        self.signer = signer or PeerSigner(None, NODE, node_id)
        self.incarnation = incarnation
        self.journal = journal
        if journal is not None:
            journal.on_flushed = self._flushed
        self.address = address
        self.table: RoutingTable | None = None
        self.groups: dict[int, Group] = {}
        self._factories = factories
        self._lease_valid_until = lease_valid_until
        # Stop serving a bit before the lease could run out: the coordinator acts
        # only once etcd expired it, and our clock and etcd's run at slightly
        # different speeds.
        self._lease_margin = min(0.25 * lease_ttl, 1.0)
        self._interceptors = list(interceptors)  # on node-to-node channels (tracing)
        self._tls = tls
        self._links: dict[str, PeerLink] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.on_drained: Callable[[], None] | None = None
        # Called with the ids of groups this node stopped leading (services end
        # what they serve from them, such as watch streams).
        self.on_lost: list[Callable[[set[int]], None]] = []
        self._drained = False
        self._map_waiters: list[asyncio.Future[None]] = []
        # Snapshots installed here and their bytes, by kind: "full", or
        # "in_memory" (a copy restarted from disk kept its durable state).
        self.snapshots: dict[str, int] = {"full": 0, "in_memory": 0}
        self.snapshot_bytes: dict[str, int] = {"full": 0, "in_memory": 0}
        # What the streams to this node's replicas carried (every link's sum).
        self.sent = SendCounts()

    # -- serving -------------------------------------------------------------

    def resolve(self, slot: int) -> Group | Redirect:
        """The local group leading ``slot``, or where it is led; raises if neither."""
        table = self.table
        if table is None:
            raise unavailable(Reason.NO_MAP, "this node has no cluster map yet")
        view = table.group_of_slot(slot)
        if view is None or not view.primary:
            raise unavailable(Reason.GROUP_UNAVAILABLE,
                              f"slot {slot} has no primary right now (failover in progress)",
                              slot=str(slot))
        if view.primary != self.node_id:
            return Redirect(slot, view.group_id, table.epoch, view.primary,
                            table.addresses.get(view.primary, ""),
                            table.peer_addresses.get(view.primary, ""))
        group = self.groups.get(view.group_id)
        if group is None or not group.writable:
            raise unavailable(Reason.GROUP_UNAVAILABLE,
                              f"group {view.group_id} is changing primary; retry",
                              slot=str(slot), group_id=str(view.group_id))
        if not self.lease_valid():
            raise unavailable(Reason.OWNERSHIP_EXPIRED,
                              "this node could not renew its etcd lease, so it no longer "
                              "takes requests for the slots it leads")
        return group

    def lease_valid(self) -> bool:
        """Whether etcd certainly still holds this node's lease (with a margin): a
        node that cannot tell no longer knows the map, so it serves no slot."""
        return time.monotonic() < self._lease_valid_until() - self._lease_margin

    def led(self, kind: int) -> list[StateMachine]:
        """Service ``kind``'s machines in the groups this node leads now."""
        return [machine for group in self.groups.values() if group.is_primary
                and (machine := group.machines.get(kind)) is not None]

    def led_in(self, group_id: int, kind: int) -> StateMachine | None:
        """Service ``kind``'s machine in group ``group_id``, if this node leads it now."""
        group = self.groups.get(group_id)
        return group.machines.get(kind) if group is not None and group.is_primary else None

    @property
    def links(self) -> Mapping[str, PeerLink]:
        """The replication link to each node replicating a group this node leads."""
        return self._links

    def count_snapshot(self, kind: str, size: int) -> None:
        """A snapshot of ``size`` bytes was installed here."""
        self.snapshots[kind] += 1
        self.snapshot_bytes[kind] += size

    def channel(self, address: str) -> grpc.aio.Channel:
        """The one channel this node uses to reach ``address``."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(
                address, self._tls, self._channel_options, self._interceptors)
        return channel

    # -- following the map -----------------------------------------------------

    def load_durable(self) -> None:
        """Take back the group copies kept on disk (at start-up, before serving).

        They hold the durable services' state only, so they serve as a replica
        only after a snapshot; the coordinator makes one the primary if its
        group was lost (every member left) and this node held it in sync.
        """
        if self.journal is None:
            return
        copies = self.journal.copies()
        for copy in copies:
            self.groups[copy.group_id] = Group(
                copy.group_id, self.node_id, self._factories, copy.origin_epoch, durable=copy,
                clock=self._clock, journal=self.journal, log_budget=self._log_budget)
        if copies:
            log.info("read back durable copies of %d group(s) from %s", len(copies),
                     self.journal.path)

    def _flushed(self, ticket: int, group_ids: Collection[int]) -> None:
        """The journal made every write up to ``ticket`` durable, those of the
        groups ``group_ids`` among them (earlier flushes told the others)."""
        groups = self.groups
        for group_id in group_ids:
            group = groups.get(group_id)
            if group is not None and group.flushing:
                group.mark_flushed(ticket)

    def _remove(self, group_id: int, why: str) -> None:
        """The group leaves this node, with what the disk holds of it."""
        group = self.groups.pop(group_id)
        if self.journal is not None:
            self.journal.drop_group(group_id, group.log.last_epoch, group.log.last_seq)
            group.dropped = True
        group.close(why)

    def on_map(self, table: RoutingTable) -> None:
        """Make this node's groups what ``table`` says (a newer map arrived)."""
        me = self.node_id
        named = table.incarnations.get(me, "")
        if named and self.incarnation and named != self.incarnation:
            # The map still describes this node's previous process: its roles
            # there went with that process's state. Route by it, act on nothing.
            self.table = table
            self._wake_map_waiters()
            return
        mine: dict[int, GroupView] = {v.group_id: v for v in table.groups_of(me)}
        led_before = {g for g, group in self.groups.items() if group.is_primary}
        recreated: set[int] = set()
        for group_id, view in mine.items():
            group = self.groups.get(group_id)
            if group is not None and group.origin_epoch < view.origin_epoch:
                # The group was made again, empty (RecoverLostGroups): what this
                # node kept of its earlier history must not come back.
                self._remove(group_id, "the group was recreated")
                recreated.add(group_id)
                group = None
            if group is None:
                group = self._create(group_id, view.origin_epoch)
            if view.primary == me:
                if group.epoch > view.epoch:
                    continue  # we have seen a newer epoch: wait for the map to catch up
                group.become_primary(view.epoch)
                self._sync_trackers(group, view, table)
            else:
                if group.is_primary:
                    group.step_down(view.epoch, "the map moved its primary")
                group.epoch = max(group.epoch, view.epoch)
        joined = named == self.incarnation and \
            table.states.get(me) == admin_pb2.NODE_STATE_ACTIVE
        for group_id in [g for g in self.groups if g not in mine]:
            if self._kept_for_revival(group_id, table):
                group = self.groups[group_id]
                if group.is_primary:  # serve nothing until the map names a primary
                    group.step_down(table.groups[group_id].epoch, "the group lost its members")
                continue
            if self.groups[group_id].restored and not joined:
                # Read back from disk: the coordinator may seat this node in
                # the group again while it joins, and the copy then catches up
                # from the log instead of a full snapshot.
                continue
            self._remove(group_id, "the group left this node")
        lost = {g for g in led_before
                if g in recreated or g not in self.groups or not self.groups[g].is_primary}
        if lost:
            for callback in self.on_lost:
                callback(lost)
        self._link_every_node(table)
        if self.table is None or self.table.epoch != table.epoch:
            led = sum(1 for g in self.groups.values() if g.is_primary)
            log.info("map epoch %d: leading %d groups, replica of %d%s", table.epoch, led,
                     len(self.groups) - led, f", stopped leading {len(lost)}" if lost else "")
        self.table = table
        self._check_drained(table)
        self._wake_map_waiters()

    def _wake_map_waiters(self) -> None:
        waiters, self._map_waiters = self._map_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def newer_map(self, timeout: float) -> None:
        """Return when the next map arrives, or after ``timeout`` seconds."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._map_waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await waiter
        finally:
            if waiter in self._map_waiters:
                self._map_waiters.remove(waiter)

    def _kept_for_revival(self, group_id: int, table: RoutingTable) -> bool:
        """A copy of a group that has no primary that the coordinator may revive
        the group from: one read back from disk, or this node's own live copy
        when the map names it among the group's last copies (its etcd lease ran
        out while it held the last in-sync copy; a pause, a partition from
        etcd). Dropping that one would lose every write it acknowledged, the
        durable ones too: the journal forgets a group that leaves."""
        group = self.groups[group_id]
        view = table.groups.get(group_id)
        return (view is not None and not view.primary
                and view.origin_epoch <= group.origin_epoch
                and (group.restored or self.node_id in view.lost_copies))

    def group_for_batch(self, batch: rpb.CommandBatch) -> Group:
        """The group a replication batch is for, created empty if new here (the map
        naming us a replica may arrive after the primary's first batch)."""
        group = self.groups.get(batch.group_id)
        return group if group is not None else self._create(batch.group_id)

    def _create(self, group_id: int, origin_epoch: int = 0) -> Group:
        group = Group(group_id, self.node_id, self._factories, origin_epoch, clock=self._clock,
                      journal=self.journal, log_budget=self._log_budget)
        self.groups[group_id] = group
        return group

    def _sync_trackers(self, group: Group, view: GroupView, table: RoutingTable) -> None:
        wanted = set(view.replicas)
        for node_id in [n for n in group.trackers if n not in wanted]:
            group.trackers.pop(node_id).detach()
        for node_id in view.replicas:
            link = self._link(node_id, table.peer_addresses.get(node_id, ""))
            since = view.since.get(node_id, 0)
            tracker = group.trackers.get(node_id)
            # A new assignment (the node was removed and assigned again, maybe in
            # maps this node never saw) starts a new tracker: what we knew of its
            # earlier copy says nothing about the new one.
            if tracker is None or tracker.link is not link or tracker.since_epoch != since:
                if tracker is not None:
                    tracker.detach()
                group.trackers[node_id] = ReplicaTracker(
                    group, node_id, link, in_sync=node_id in view.in_sync, since_epoch=since)
            elif node_id in view.in_sync:
                tracker.in_sync = True
        group.advance_commit()

    def _link_every_node(self, table: RoutingTable) -> None:
        """A started link to every other node ``table`` names, and none to the
        nodes it no longer does. An idle link heartbeats, so this node notices
        and reports (`nodes.stalls`) any node that stops answering it, not only
        one holding a copy of a group led here: a node cut off from its peers
        needs two of them to report it before its groups fail over, and a peer
        leading no group copied there used to report it only once the
        coordinator happened to seat such a copy (twice as late in
        ``tests/test_partitions.py``'s cut-off scenario)."""
        me = self.node_id
        wanted = {n: a for n, a in table.peer_addresses.items() if n != me and a}
        for node_id in [n for n, link in self._links.items()
                        if n not in wanted and not len(link)]:
            self._in_background(self._links.pop(node_id).close())
        for node_id, address in wanted.items():
            self._link(node_id, address).start()

    def _link(self, node_id: str, address: str) -> PeerLink:
        link = self._links.get(node_id)
        if link is None or link.address != address:
            if link is not None:
                self._in_background(link.close())
            link = self._links[node_id] = PeerLink(
                node_id, address, self.channel(address), self.address, self.signer,
                self.sent)
        return link

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        # The loop keeps only weak references to tasks: hold ours until done.
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _check_drained(self, table: RoutingTable) -> None:
        if self._drained or table.states.get(self.node_id) != admin_pb2.NODE_STATE_DRAINING:
            return
        if any(True for _ in table.groups_of(self.node_id)):
            return
        self._drained = True
        log.info("drained: this node holds no group any more; stopping")
        if self.on_drained is not None:
            self.on_drained()

    async def close(self) -> None:
        for group in self.groups.values():
            group.close("the node is stopping")
        self.groups.clear()
        for link in self._links.values():
            await link.close()
        self._links.clear()
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
