"""A group's replication rules, without a network: epochs fence, positions must
match, trackers choose between resending and snapshots, commits wait for in-sync
replicas."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.clustermap import RoutingTable
from common.errors import MeshStatusError
from mesh.admin.v1 import admin_pb2
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication.group import Group
from nodes.replication.journal import DurableCopy
from nodes.replication.machine import NOTHING, Applied, Persist
from nodes.replication.manager import Replication
from nodes.replication.sender import Phase, ReplicaTracker


class Recorder:
    """A state machine that remembers the payloads it applied."""

    service = rpb.SERVICE_KIND_CACHE
    durable = False
    additive_restore = False

    def __init__(self, group: Group) -> None:
        self.applied: list[bytes] = []

    def apply(self, command: rpb.Command) -> Applied:
        self.applied.append(command.payload)
        return NOTHING

    def snapshot(self) -> list[tuple[int, bytes]]:
        return [(0, b",".join(self.applied))]

    def restore(self, chunks: Any) -> list[Persist]:
        for _, data in chunks:
            self.applied = data.split(b",") if data else []
        return []

    def role_changed(self) -> None:
        pass

    def close(self) -> None:
        pass


class Link:
    """Stands in for a PeerLink: the tracker only attaches, detaches and wakes."""

    def attach(self, tracker: ReplicaTracker) -> None:
        pass

    def detach(self, tracker: ReplicaTracker) -> None:
        pass

    def wake(self, tracker: ReplicaTracker) -> None:
        pass


def replica_of(group: Group) -> ReplicaTracker:
    """An in-sync replica "b" of ``group``: its commits wait for what `acked` gives."""
    tracker = ReplicaTracker(group, "b", Link(), in_sync=True)  # type: ignore[arg-type]
    group.trackers = {"b": tracker}
    return tracker


def acked(tracker: ReplicaTracker, seq: int | None = None) -> None:
    """The replica holds every command up to ``seq`` (default: all): they commit."""
    tracker.acked_seq = tracker.group.log.last_seq if seq is None else seq
    tracker.group.advance_commit()


def group(node: str = "a") -> Group:
    return Group(1, node, {rpb.SERVICE_KIND_CACHE: Recorder})


def batch(epoch: int, prev: tuple[int, int], *payloads: bytes, start: int = 0,
          cmd_epoch: int | None = None) -> rpb.CommandBatch:
    first = (start or prev[1]) + 1
    return rpb.CommandBatch(
        group_id=1, epoch=epoch, prev_epoch=prev[0], prev_seq=prev[1],
        commands=[rpb.Command(seq=first + i, epoch=cmd_epoch or epoch, payload=p,
                              service=rpb.SERVICE_KIND_CACHE)
                  for i, p in enumerate(payloads)])


def applied(g: Group) -> list[bytes]:
    recorder = g.machines[rpb.SERVICE_KIND_CACHE]
    assert isinstance(recorder, Recorder)
    return recorder.applied


def test_replica_applies_in_order_and_refuses_gaps_and_old_epochs() -> None:
    replica = group("b")
    assert replica.apply_batch(batch(1, (0, 0), b"x", b"y")).status == rpb.ACK_STATUS_OK
    gap = replica.apply_batch(batch(1, (1, 5), b"z"))
    assert gap.status == rpb.ACK_STATUS_POSITION_MISMATCH and gap.applied_seq == 2
    assert replica.apply_batch(batch(2, (1, 2), b"z")).status == rpb.ACK_STATUS_OK
    stale = replica.apply_batch(batch(1, (2, 3), b"old"))
    assert stale.status == rpb.ACK_STATUS_STALE_EPOCH and stale.seen_epoch == 2
    assert applied(replica) == [b"x", b"y", b"z"]


def test_a_primary_seeing_a_newer_epoch_steps_down() -> None:
    old = group("a")
    old.become_primary(1)
    old.propose(0, rpb.SERVICE_KIND_CACHE, b"mine")
    ack = old.apply_batch(batch(2, (1, 1), b"theirs"))
    assert not old.is_primary and ack.status == rpb.ACK_STATUS_OK


async def test_commit_waits_for_in_sync_replicas_only() -> None:
    primary = group("a")
    primary.become_primary(1)
    synced = ReplicaTracker(primary, "b", Link(), in_sync=True)  # type: ignore[arg-type]
    catching_up = ReplicaTracker(primary, "c", Link(), in_sync=False)  # type: ignore[arg-type]
    primary.trackers = {"b": synced, "c": catching_up}
    seq = primary.propose(0, rpb.SERVICE_KIND_CACHE, b"w").seq
    waiter = asyncio.ensure_future(primary.wait_committed(seq))
    await asyncio.sleep(0)
    assert not waiter.done()
    synced.on_ack(rpb.Ack(group_id=1, epoch=1, applied_epoch=1, applied_seq=seq,
                          status=rpb.ACK_STATUS_OK))
    await asyncio.wait_for(waiter, 1)  # c's lag does not hold the write


class Sums(Recorder):
    """A machine whose commands add a number and return the new total."""

    def __init__(self, group: Group) -> None:
        super().__init__(group)
        self.total = 0

    def apply(self, command: rpb.Command) -> Applied:
        self.total += int(command.payload)
        return Applied(self.total)


async def test_a_proposal_is_applied_at_once_and_its_result_counts_once_committed() -> None:
    primary = Group(1, "a", {rpb.SERVICE_KIND_CACHE: Sums})
    replica = Group(1, "b", {rpb.SERVICE_KIND_CACHE: Sums})
    primary.become_primary(1)
    tracker = ReplicaTracker(primary, "b", Link(), in_sync=True)  # type: ignore[arg-type]
    primary.trackers = {"b": tracker}
    first = primary.propose(0, rpb.SERVICE_KIND_CACHE, b"2")
    second = primary.propose(0, rpb.SERVICE_KIND_CACHE, b"40")
    assert (first.result, second.result) == (2, 42)  # applied here, in order
    answer = asyncio.ensure_future(second.committed())
    await asyncio.sleep(0)
    assert not answer.done()  # not before the replica holds it
    ack = replica.apply_batch(rpb.CommandBatch(
        group_id=1, epoch=1, in_sync=True, commands=primary.log.since(0, 10)))
    machine = replica.machines[rpb.SERVICE_KIND_CACHE]
    assert isinstance(machine, Sums) and machine.total == 42  # the same apply, replayed
    tracker.on_ack(ack)
    assert await asyncio.wait_for(answer, 1) == 42


async def test_fencing_fails_pending_writes() -> None:
    primary = group("a")
    primary.become_primary(1)
    tracker = ReplicaTracker(primary, "b", Link(), in_sync=True)  # type: ignore[arg-type]
    primary.trackers = {"b": tracker}
    waiter = asyncio.ensure_future(
        primary.wait_committed(primary.propose(0, rpb.SERVICE_KIND_CACHE, b"w").seq))
    await asyncio.sleep(0)
    tracker.on_ack(rpb.Ack(group_id=1, status=rpb.ACK_STATUS_STALE_EPOCH, seen_epoch=2))
    with pytest.raises(MeshStatusError) as info:
        await waiter
    assert info.value.reason == "NOT_COMMITTED" and not primary.writable


def test_tracker_resends_from_history_or_asks_for_a_snapshot() -> None:
    primary = group("a")
    primary.become_primary(2)
    for payload in (b"1", b"2", b"3"):
        primary.propose(0, rpb.SERVICE_KIND_CACHE, payload)
    tracker = ReplicaTracker(primary, "b", Link(), in_sync=False)  # type: ignore[arg-type]
    probe = tracker.next_batch("a:1")
    assert probe is not None and not probe.commands and probe.prev_seq == 3
    # Behind, on our history: resend from there.
    tracker.on_ack(rpb.Ack(group_id=1, applied_epoch=2, applied_seq=1,
                           status=rpb.ACK_STATUS_POSITION_MISMATCH))
    resend = tracker.next_batch("a:1")
    assert resend is not None and [c.seq for c in resend.commands] == [2, 3]
    tracker.on_ack(rpb.Ack(group_id=1, applied_epoch=2, applied_seq=3,
                           status=rpb.ACK_STATUS_OK))
    assert tracker.in_sync  # caught up: its acks count from now on
    # Diverged (a deposed primary's seq 3 at epoch 1): snapshot.
    tracker.reset()
    tracker.on_ack(rpb.Ack(group_id=1, applied_epoch=1, applied_seq=3,
                           status=rpb.ACK_STATUS_POSITION_MISMATCH))
    assert tracker.phase is Phase.SNAPSHOT
    install = tracker.next_batch("a:1")
    assert install is not None and install.install_snapshot


def test_snapshot_install_replaces_state_and_position() -> None:
    source = group("a")
    source.become_primary(3)
    for payload in (b"p", b"q"):
        source.propose(0, rpb.SERVICE_KIND_CACHE, payload)
    replica = group("b")
    replica.apply_batch(batch(1, (0, 0), b"diverged"))
    epoch, seq, chunks = source.take_snapshot()
    replica.install(epoch, seq, chunks)
    assert replica.applied == (3, 2) and applied(replica) == [b"p", b"q"]
    assert replica.apply_batch(batch(3, (3, 2), b"r")).status == rpb.ACK_STATUS_OK


def one_group(epoch: int, primary: str = "a", origin: int = 0,
              lost: tuple[str, ...] = ()) -> RoutingTable:
    """A map of one group over every slot, led by ``primary`` (node "a" is in the
    map while it leads; no primary: a lost group, its last copies ``lost``)."""
    m = admin_pb2.ClusterMap(epoch=epoch)
    m.groups.add(group_id=1, epoch=epoch, primary_node_id=primary, origin_epoch=origin,
                 lost_copies=lost, slot_ranges=[admin_pb2.SlotRange(start=0, end=16383)])
    if primary:
        m.nodes.add(node_id="a", address="a:1", state=admin_pb2.NODE_STATE_ACTIVE)
    return RoutingTable(m)


def replication_on_a() -> tuple[Replication, list[set[int]]]:
    """Node "a"'s groups, and the sets of groups it reports it stopped leading."""
    replication = Replication("a", "a:1", {rpb.SERVICE_KIND_CACHE: Recorder},
                              lambda: float("inf"), 5)
    lost: list[set[int]] = []
    replication.on_lost.append(lost.append)
    return replication, lost


async def test_a_recreated_group_drops_the_copy_from_its_earlier_history() -> None:
    replication, lost = replication_on_a()
    replication.on_map(one_group(1))
    old = replication.groups[1]
    old.propose(0, rpb.SERVICE_KIND_CACHE, b"x")
    replication.on_map(one_group(2))  # same history: kept
    assert replication.groups[1] is old
    replication.on_map(one_group(7, origin=7))  # made again: starts empty
    new = replication.groups[1]
    assert new is not old and new.is_primary and new.applied == (0, 0)
    assert lost == [{1}]
    await replication.close()


async def test_a_live_last_copy_is_kept_while_its_group_is_lost() -> None:
    """The map drops this node (its etcd lease ran out) and the group it alone
    held has no primary, naming it among the last copies: the copy stays, whole
    and serving nothing, and the revival leads from it. A lost group whose last
    copies were elsewhere is dropped as before."""
    replication, lost = replication_on_a()
    replication.on_map(one_group(1))
    copy = replication.groups[1]
    copy.propose(0, rpb.SERVICE_KIND_CACHE, b"acked")
    replication.on_map(one_group(2, primary="", lost=("a",)))
    assert replication.groups[1] is copy and not copy.is_primary and lost == [{1}]
    with pytest.raises(MeshStatusError):
        await copy.wait_committed(copy.log.last_seq + 1)  # no writes meanwhile
    replication.on_map(one_group(3))  # revived here
    assert replication.groups[1] is copy and copy.is_primary and copy.epoch == 3
    assert applied(copy) == [b"acked"]
    replication.on_map(one_group(4, primary="", lost=("b",)))  # lost elsewhere: not ours
    assert 1 not in replication.groups
    await replication.close()


async def test_a_read_barrier_commits_through_the_replicas_or_fails_if_deposed() -> None:
    primary = group("a")
    primary.become_primary(1)
    tracker = ReplicaTracker(primary, "b", Link(), in_sync=True)  # type: ignore[arg-type]
    primary.trackers = {"b": tracker}
    barrier = asyncio.ensure_future(primary.barrier(0))
    await asyncio.sleep(0)
    assert not barrier.done()  # a linearizable read waits for the replica
    tracker.on_ack(rpb.Ack(group_id=1, epoch=1, applied_epoch=1,
                           applied_seq=primary.log.last_seq, status=rpb.ACK_STATUS_OK))
    await asyncio.wait_for(barrier, 1)
    assert applied(primary) == []  # the no-op changed no state

    # A replica that knows a newer epoch refuses the barrier: no stale read.
    deposed = asyncio.ensure_future(primary.barrier(0))
    await asyncio.sleep(0)
    tracker.on_ack(rpb.Ack(group_id=1, status=rpb.ACK_STATUS_STALE_EPOCH, seen_epoch=2))
    with pytest.raises(MeshStatusError) as info:
        await deposed
    assert info.value.reason == "NOT_COMMITTED"

    # On a replica the no-op is logged and changes nothing either.
    replica = group("b")
    noop = rpb.CommandBatch(group_id=1, epoch=1, commands=[
        rpb.Command(seq=1, epoch=1, service=rpb.SERVICE_KIND_UNSPECIFIED)])
    assert replica.apply_batch(noop).status == rpb.ACK_STATUS_OK
    assert replica.applied == (1, 1) and applied(replica) == []


async def test_a_read_resuming_after_its_group_changed_hands_is_refused() -> None:
    """A handler that must read after an await (a read barrier, a long poll)
    takes the machine from `still_led`: the group it was given may have been
    handed over (or left the node, machines and all) while it waited, even if
    what it waited for committed first."""
    primary = group("a")
    primary.become_primary(1)
    assert primary.still_led(rpb.SERVICE_KIND_CACHE) is primary.machines[rpb.SERVICE_KIND_CACHE]
    primary.step_down(2, "node b leads epoch 2")  # still a replica here
    with pytest.raises(MeshStatusError) as info:
        primary.still_led(rpb.SERVICE_KIND_CACHE)
    assert info.value.reason == "GROUP_UNAVAILABLE" and info.value.metadata == {"group_id": "1"}

    gone = group("a")
    gone.become_primary(1)
    gone.close("the map moved it to another node")
    with pytest.raises(MeshStatusError) as info:
        gone.still_led(rpb.SERVICE_KIND_CACHE)
    assert info.value.reason == "GROUP_UNAVAILABLE"


class DurableRecorder(Recorder):
    """A Recorder standing for a durable service (its state survives a restart)."""

    service = rpb.SERVICE_KIND_EVENTS
    durable = True
    additive_restore = False


def both(node: str, durable: DurableCopy | None = None) -> Group:
    """A group with an in-memory service (cache) and a durable one (events)."""
    return Group(1, node, {rpb.SERVICE_KIND_CACHE: Recorder,
                           rpb.SERVICE_KIND_EVENTS: DurableRecorder}, durable=durable)


def applied_by(g: Group, kind: int) -> list[bytes]:
    machine = g.machines[kind]
    assert isinstance(machine, Recorder)
    return machine.applied


def kinds_batch(epoch: int, prev: tuple[int, int], *kinds: int) -> rpb.CommandBatch:
    return rpb.CommandBatch(
        group_id=1, epoch=epoch, prev_epoch=prev[0], prev_seq=prev[1],
        commands=[rpb.Command(seq=prev[1] + 1 + i, epoch=epoch, service=kind,  # type: ignore[arg-type]
                              payload=str(prev[1] + 1 + i).encode())
                  for i, kind in enumerate(kinds)])


def test_a_copy_restarted_from_disk_copies_only_its_in_memory_state() -> None:
    cache, events = rpb.SERVICE_KIND_CACHE, rpb.SERVICE_KIND_EVENTS
    primary = both("a")
    primary.become_primary(2)
    for seq, kind in enumerate((cache, events, cache, events, cache), start=1):
        primary.propose(0, kind, str(seq).encode())
    # The replica kept seqs 1..2 on disk: its durable service holds seq 2's state.
    replica = both("b", DurableCopy(group_id=1, origin_epoch=0, epoch=2, seq=2))
    applied_by(replica, events).append(b"2")
    tracker = ReplicaTracker(primary, "b", Link(), in_sync=False)  # type: ignore[arg-type]
    probe = tracker.next_batch("a:1")
    assert probe is not None
    ack = replica.apply_batch(probe)
    assert ack.status == rpb.ACK_STATUS_NEEDS_SNAPSHOT and ack.applied_seq == 2
    tracker.on_ack(ack)
    install = tracker.next_batch("a:1")
    assert install is not None and install.install_snapshot and install.keep_durable
    # The in-memory service's state at seq 5; the durable one's stays at seq 2.
    assert replica.in_memory_services() == [cache]
    epoch, seq, taken = primary.take_snapshot([cache])
    chunks = list(taken)  # made as iterated: once
    assert {service for service, _, _ in chunks} == {cache}
    assert replica.install_in_memory(epoch, seq, chunks)
    tracker.on_ack(replica.ack_ok())
    assert tracker.phase is Phase.STREAM and tracker.next_seq == 3
    resend = tracker.next_batch("a:1")
    assert resend is not None and [c.seq for c in resend.commands] == [3, 4, 5]
    assert replica.apply_batch(resend).status == rpb.ACK_STATUS_OK
    # Seqs 3..5 went to the durable service only: the cache already had them.
    assert applied_by(replica, events) == [b"2", b"4"]
    assert applied_by(replica, cache) == applied_by(primary, cache) == [b"1", b"3", b"5"]
    # From now on every command goes to both.
    assert replica.apply_batch(kinds_batch(2, (2, 5), cache, events)).status \
        == rpb.ACK_STATUS_OK
    assert applied_by(replica, cache)[-1] == b"6" and applied_by(replica, events)[-1] == b"7"


def test_a_restarted_copy_off_the_log_or_the_history_gets_a_full_snapshot() -> None:
    primary = both("a")
    primary.become_primary(3)
    primary.propose(0, rpb.SERVICE_KIND_CACHE, b"")
    tracker = ReplicaTracker(primary, "b", Link(), in_sync=False)  # type: ignore[arg-type]
    # Seq 1 of a deposed primary's epoch 2: not our history.
    tracker.on_ack(rpb.Ack(group_id=1, applied_epoch=2, applied_seq=1,
                           status=rpb.ACK_STATUS_NEEDS_SNAPSHOT))
    install = tracker.next_batch("a:1")
    assert install is not None and install.install_snapshot and not install.keep_durable


def test_in_memory_state_from_a_deposed_primary_is_copied_again() -> None:
    cache = rpb.SERVICE_KIND_CACHE
    replica = both("b", DurableCopy(group_id=1, origin_epoch=0, epoch=2, seq=2))
    replica.epoch = 2
    source = both("a")
    source.become_primary(2)
    applied_by(source, cache).extend([b"x", b"y"])
    assert replica.install_in_memory(2, 4, source.take_snapshot([cache])[2])
    assert applied_by(replica, cache) == [b"x", b"y"]
    # Epoch 3 begins before the durable side caught up to seq 4: the copied state
    # may hold epoch 2's lost commands, so it is dropped and asked for again.
    ack = replica.apply_batch(kinds_batch(3, (2, 2)))
    assert ack.status == rpb.ACK_STATUS_NEEDS_SNAPSHOT and applied_by(replica, cache) == []
    # Made primary instead while behind: the in-memory services start empty.
    other = both("c", DurableCopy(group_id=1, origin_epoch=0, epoch=2, seq=2))
    assert other.install_in_memory(2, 4, source.take_snapshot([cache])[2])
    other.become_primary(3)
    assert applied_by(other, cache) == [] and other.applied == (2, 2)


class Pieces(Recorder):
    """A Recorder whose snapshot is a piece per payload, restored additively (as
    the cache's is): an install yields between pieces."""

    additive_restore = True

    def snapshot(self) -> list[tuple[int, bytes]]:
        return [(0, payload) for payload in self.applied]

    def restore(self, chunks: Any) -> list[Persist]:
        self.applied.extend(data for _, data in chunks)
        return []


def snapshot_of(*payloads: bytes) -> tuple[int, int, list[tuple[int, int, bytes]]]:
    source = Group(1, "a", {rpb.SERVICE_KIND_CACHE: Pieces})
    source.become_primary(2)
    for payload in payloads:
        source.propose(0, rpb.SERVICE_KIND_CACHE, payload)
    epoch, seq, chunks = source.take_snapshot()
    return epoch, seq, list(chunks)


def test_a_snapshot_closed_halfway_is_finished_not_left_empty() -> None:
    epoch, seq, chunks = snapshot_of(b"p", b"q", b"r")
    replica = Group(1, "b", {rpb.SERVICE_KIND_CACHE: Pieces})
    steps = replica.installing(epoch, seq, chunks)
    next(steps)
    assert applied(replica) == [b"p"]  # half of it
    reported = replica.position()  # what GetPosition tells the coordinator meanwhile
    # Its stream broke (the primary died: the install task is cancelled) or the
    # epoch moved on. The map may still count this replica in sync: emptied, it
    # could be promoted and lead with nothing.
    steps.close()
    assert replica.applied == (reported.applied_epoch, reported.applied_seq) == (2, 3)
    assert applied(replica) == [b"p", b"q", b"r"]


async def test_a_replica_made_primary_halfway_through_a_snapshot_finishes_it_first() -> None:
    epoch, seq, chunks = snapshot_of(b"p", b"q", b"r")
    replication = Replication("b", "b:1", {rpb.SERVICE_KIND_CACHE: Pieces},
                              lambda: float("inf"), 5)
    replica = replication.group_for_batch(batch(2, (0, 0)))
    assert replica.apply_batch(batch(2, (0, 0), b"p")).status == rpb.ACK_STATUS_OK
    # The primary asked for a snapshot (its log no longer reached this in-sync
    # replica's position, say): the install is halfway when the primary dies
    # and the coordinator promotes this copy, the in-sync one.
    replica.snapshotting = True
    steps = replica.installing(epoch, seq, chunks)
    next(steps)
    cmap = admin_pb2.ClusterMap(epoch=3)
    cmap.groups.add(group_id=1, epoch=3, primary_node_id="b",
                    slot_ranges=[admin_pb2.SlotRange(start=0, end=16383)])
    cmap.nodes.add(node_id="b", address="b:1", state=admin_pb2.NODE_STATE_ACTIVE)
    replication.on_map(RoutingTable(cmap))
    # It leads with the whole snapshot, never half of it...
    assert replica.is_primary and replica.applied == (2, 3)
    assert applied(replica) == [b"p", b"q", b"r"]
    # ...and the install task, seeing it moved on, ends its steps: nothing undone.
    steps.close()
    assert replica.applied == (2, 3) and applied(replica) == [b"p", b"q", b"r"]
    assert replica.propose(0, rpb.SERVICE_KIND_CACHE, b"s").seq == 4
    await replication.close()


async def test_a_node_keeps_a_link_to_every_other_node_of_the_map() -> None:
    """One for each node the map names, carrying groups or not (idle, it heartbeats:
    `nodes.stalls` then hears of any node gone silent), and none once the map
    drops the node. The links reach nothing here; they only have to exist."""
    replication, _ = replication_on_a()
    m = admin_pb2.ClusterMap(epoch=1)
    m.groups.add(group_id=1, epoch=1, primary_node_id="a",
                 slot_ranges=[admin_pb2.SlotRange(start=0, end=16383)])
    for node in "abc":
        m.nodes.add(node_id=node, address=f"{node}:1", state=admin_pb2.NODE_STATE_ACTIVE)
    replication.on_map(RoutingTable(m))
    assert sorted(replication.links) == ["b", "c"]  # the group has no replica on either
    assert not any(len(link) for link in replication.links.values())
    del m.nodes[2]
    m.epoch = 2
    replication.on_map(RoutingTable(m))
    assert sorted(replication.links) == ["b"]
    await replication.close()
