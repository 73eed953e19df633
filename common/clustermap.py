"""The cluster map: which replica group owns each slot, and which nodes hold it.

The leading coordinator stores the map in etcd as a serialized
``mesh.admin.v1.ClusterMap`` under ``/<cluster>/map``; nodes and clients follow
that key. The slot space is cut once, when the map is created, into
``group_count`` contiguous ranges, one per group, and never re-cut: what moves
between nodes is a whole group (like Couchbase's vBuckets), so moving data is
always "snapshot, then command stream", the path a new replica takes anyway.

`RoutingTable` is the read side everybody shares: slot -> group -> primary ->
address, in O(1). `MapFollower` keeps the newest table from etcd (a read, then a
watch; epochs only grow, so an older map is never taken).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aetcd

from common.etcd import EtcdAccess, PrefixFollower, client_for
from common.slots import SLOT_COUNT, slot_for
from mesh.admin.v1 import admin_pb2

log = logging.getLogger(__name__)

DEFAULT_GROUP_COUNT = 1024
"""Groups a new cluster is cut into (fixed from then on): as Couchbase's 1024
vBuckets, enough that up to ~100 nodes lead within 7.4% of the mean primaries
(1.016x at 20 nodes, 1.025x at 50; 256 groups gave 1.17x at 50), cheap enough
on 3 nodes: in alternating runs the scheduler, lock and event rows read the
same as with 256, for ~8 MB more RSS per node and an idle node's CPU at 1.4%
of a core instead of 0.7%. Past ~100 nodes choose 4096 (`--groups`)."""


def map_key(cluster: str) -> bytes:
    """The etcd key holding the serialized ClusterMap."""
    return f"/{cluster}/map".encode()


def leader_key(cluster: str) -> bytes:
    """The etcd key the leading coordinator holds under its lease."""
    return f"/{cluster}/coordinator/leader".encode()


def group_ranges(group_count: int) -> list[tuple[int, int]]:
    """Cut the slot space into ``group_count`` contiguous, near-equal ranges."""
    if not 1 <= group_count <= SLOT_COUNT:
        raise ValueError(f"group_count must be 1..{SLOT_COUNT}, got {group_count}")
    bounds = [i * SLOT_COUNT // group_count for i in range(group_count + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(group_count)]


def slot_count(group: admin_pb2.Group) -> int:
    """How many slots a group owns."""
    return sum(r.end - r.start + 1 for r in group.slot_ranges)


@dataclass(frozen=True, slots=True)
class GroupView:
    """One group as the map has it."""

    group_id: int
    epoch: int
    primary: str
    """Node id of the primary; empty when the group has none (all members lost)."""
    replicas: tuple[str, ...]
    in_sync: frozenset[str]
    """Replicas that count for commits and may be promoted."""
    slots: int
    since: dict[str, int]
    """Replica node id -> map epoch of its assignment to the group."""
    origin_epoch: int = 0
    """Epoch at which the group's history began (copies from before it are void)."""
    lost_copies: tuple[str, ...] = ()
    """For a group with no primary: the nodes whose copies held every acknowledged
    write when its last member left (the coordinator revives it from one)."""

    @property
    def members(self) -> tuple[str, ...]:
        return ((self.primary,) if self.primary else ()) + self.replicas


class RoutingTable:
    """An immutable, indexed view of one ClusterMap."""

    __slots__ = ("_slot_group", "addresses", "epoch", "groups", "incarnations",
                 "peer_addresses", "proto", "states")

    def __init__(self, cmap: admin_pb2.ClusterMap) -> None:
        self.proto = cmap
        self.epoch = cmap.epoch
        self.groups: dict[int, GroupView] = {}
        self._slot_group = array("H", bytes(2 * SLOT_COUNT))  # 0: no group
        for group in cmap.groups:
            self.groups[group.group_id] = GroupView(
                group_id=group.group_id,
                epoch=group.epoch,
                primary=group.primary_node_id,
                replicas=tuple(r.node_id for r in group.replicas),
                in_sync=frozenset(r.node_id for r in group.replicas if r.in_sync),
                slots=slot_count(group),
                since={r.node_id: r.since_epoch for r in group.replicas},
                origin_epoch=group.origin_epoch,
                lost_copies=tuple(group.lost_copies),
            )
            for r in group.slot_ranges:
                for slot in range(r.start, r.end + 1):
                    self._slot_group[slot] = group.group_id
        self.addresses = {n.node_id: n.address for n in cmap.nodes}
        self.peer_addresses = {n.node_id: n.peer_address or n.address for n in cmap.nodes}
        self.states = {n.node_id: n.state for n in cmap.nodes}
        self.incarnations = {n.node_id: n.incarnation for n in cmap.nodes}

    @classmethod
    def parse(cls, raw: bytes) -> RoutingTable:
        cmap = admin_pb2.ClusterMap()
        cmap.ParseFromString(raw)
        return cls(cmap)

    def group_of_slot(self, slot: int) -> GroupView | None:
        group_id = self._slot_group[slot]
        return self.groups.get(group_id) if group_id else None

    def primary_address(self, group: GroupView) -> str | None:
        return self.addresses.get(group.primary) if group.primary else None

    def groups_of(self, node_id: str) -> Iterable[GroupView]:
        """Groups in which ``node_id`` holds the primary or a replica."""
        return (g for g in self.groups.values() if node_id in g.members)

    def primary_slots(self) -> dict[str, int]:
        """Node id -> how many slots it leads."""
        counts: dict[str, int] = {}
        for group in self.groups.values():
            counts[group.primary] = counts.get(group.primary, 0) + group.slots
        return counts

    def settled(self, nodes: Iterable[str], replicas: int) -> bool:
        """Every group led by one of ``nodes`` (exactly the map's nodes), with
        ``replicas`` in-sync replicas among them (fewer if there are not enough
        nodes), and no move pending."""
        members = set(nodes)
        want = min(replicas, len(members) - 1)
        if set(self.addresses) != members or not self.groups:
            return False
        return all(
            not group.HasField("target") and group.primary_node_id in members
            and len(group.replicas) == want
            and all(r.in_sync and r.node_id in members for r in group.replicas)
            for group in self.proto.groups
        )

    def key_led_by(self, node_id: str, prefix: str = "probe") -> str:
        """The first of ``prefix-0``, ``prefix-1``, ... whose group ``node_id`` leads."""
        if not any(g.primary == node_id for g in self.groups.values()):
            raise ValueError(f"{node_id} leads no group")
        for i in itertools.count():
            key = f"{prefix}-{i}"
            group = self.group_of_slot(slot_for(key))
            if group is not None and group.primary == node_id:
                return key
        raise AssertionError("unreachable")


class MapFollower:
    """The newest cluster map in etcd, kept current by a watch.

    ``table`` is None until a map exists (no coordinator has written one yet).
    Listeners run synchronously on every newer map; an older or equal epoch is
    ignored, so a late read can never move a follower back.
    """

    def __init__(self, etcd: aetcd.Client, cluster: str) -> None:
        self._key = map_key(cluster)
        self.table: RoutingTable | None = None
        self._listeners: list[Callable[[RoutingTable], None]] = []
        self._changed = asyncio.Condition()
        self._notifying: set[asyncio.Task[None]] = set()
        self._follower = PrefixFollower(etcd, self._key, self._on_read, self._on_event,
                                        name="mesh-map-follower")

    def on_change(self, listener: Callable[[RoutingTable], None]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        """Read the map (raising if etcd is unreachable), then follow it."""
        await self._follower.start()

    async def refresh(self) -> None:
        """Read the map now; errors are swallowed (the watch keeps trying)."""
        await self._follower.refresh()

    async def close(self) -> None:
        await self._follower.close()

    async def wait_for(self, predicate: Callable[[RoutingTable], bool], timeout: float) -> bool:
        """Wait until the current table satisfies ``predicate``; False on timeout."""
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self.table is not None and predicate(self.table))
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            return False
        return True

    def offer(self, raw: bytes) -> bool:
        """Take a serialized map if it is newer than ours; True if taken."""
        try:
            table = RoutingTable.parse(raw)
        except Exception as exc:  # a corrupt value must not stop the follower
            log.warning("ignoring unreadable cluster map: %s", exc)
            return False
        if self.table is not None and table.epoch <= self.table.epoch:
            return False
        self.table = table
        for listener in self._listeners:
            try:
                listener(table)
            except Exception:
                log.exception("cluster map listener %r failed", listener)
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifying.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._notifying.discard)
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _on_read(self, kvs: list[tuple[bytes, bytes, int]]) -> None:
        # A prefix read (the key's own prefix): skip keys that merely start alike.
        for key, value, _ in kvs:
            if key == self._key:
                self.offer(value)

    def _on_event(self, kind: str, key: bytes, value: bytes, _revision: int) -> None:
        if kind == "PUT" and key == self._key:
            self.offer(value)


# -- reading the map from outside (tools, tests, benchmarks) ---------------------------


async def read_map(etcd_endpoint: str | EtcdAccess, cluster: str) -> RoutingTable | None:
    """The map now in etcd, or None if no coordinator has written one (``etcd_endpoint``:
    a plaintext endpoint, or an EtcdAccess with TLS and credentials)."""
    client = client_for(etcd_endpoint)
    try:
        found = await client.get(map_key(cluster))
        return RoutingTable.parse(found.value) if found is not None else None
    finally:
        await client.close()


async def wait_for_map(etcd_endpoint: str | EtcdAccess, cluster: str,
                       predicate: Callable[[RoutingTable], bool], timeout: float,
                       what: str = "the map") -> RoutingTable:
    """Poll etcd until the map satisfies ``predicate``; TimeoutError after ``timeout``
    seconds. Read errors (etcd restarting) only mean "not yet"."""
    deadline = time.monotonic() + timeout
    table: RoutingTable | None = None
    while time.monotonic() < deadline:
        try:
            table = await read_map(etcd_endpoint, cluster)
        except Exception:
            table = None
        if table is not None and predicate(table):
            return table
        await asyncio.sleep(0.05)
    epoch = table.epoch if table is not None else None
    raise TimeoutError(f"{cluster}: no {what} after {timeout:g} s (map epoch {epoch})")


async def wait_settled(etcd_endpoint: str | EtcdAccess, cluster: str, nodes: Iterable[str],
                       replicas: int = 1, timeout: float = 30.0) -> RoutingTable:
    """The first map that is `RoutingTable.settled` over exactly ``nodes``."""
    members = sorted(set(nodes))
    return await wait_for_map(etcd_endpoint, cluster,
                              lambda t: t.settled(members, replicas), timeout,
                              f"settled map over {members}")
