"""Lock decisions on a primary and their replay on a replica, without a network.

A real `Group` with no replicas commits at once; a second group stands for a
replica and applies the primary's commands as the replication layer would.
Time is a `ManualClock`: a lease expires when the test advances it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.clock import MILLISECOND, SECOND, ManualClock, from_seconds
from common.errors import MeshStatusError, ServiceError
from mesh.lock.v1 import lock_pb2 as lock_pb
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.config import LockLimits
from nodes.lock.machine import LOCK, LockMachine
from nodes.lock.primary import LockPrimary
from nodes.lock.service import LockService
from nodes.lock.table import EPOCH_SHIFT, LeaseCount, LockTable
from nodes.lock.waiters import Grant, Waiter
from nodes.replication.group import Group
from tests.fakes import Here
from tests.unit.test_replication_group import replica_of

LIMITS = LockLimits(max_waiters=3)


def _group(node: str, epoch: int, primary: bool, clock: ManualClock | None = None) -> Group:
    clock = clock or ManualClock()
    group = Group(7, node, {LOCK: lambda g: LockMachine(g, LIMITS, clock=clock)},
                  clock=clock)
    if primary:
        group.become_primary(epoch)
    else:
        group.epoch = epoch
    return group


def _machine(group: Group) -> LockPrimary:
    """The group's locks as its primary decides on them (``.table``, ``.queues``)."""
    machine = group.machines[LOCK]
    assert isinstance(machine, LockMachine)
    return machine.primary


def _replay(primary: Group, replica: Group, after: int = 0) -> None:
    machine = replica.machines[LOCK]
    for command in primary.log.since(after, 10_000):
        machine.apply(command)


def _acquire(machine: LockPrimary, name: str, *, wait: float = 0.0, permits: int = 1,
             max_permits: int = 1, ttl: float = 10.0, request_id: str = "",
             owner: str = "", shared: bool = False) -> Grant | Waiter:
    return machine.acquire(name, owner=owner, permits=permits, max_permits=max_permits,
                           ttl_ns=from_seconds(ttl), request_id=request_id,
                           wait_ns=from_seconds(wait), shared=shared)


def _granted(outcome: Grant | Waiter) -> Grant:
    assert isinstance(outcome, Grant)
    return outcome


async def test_tokens_start_at_the_epoch_and_grow() -> None:
    primary = _group("a", epoch=3, primary=True)
    m = _machine(primary)
    first = _granted(_acquire(m, "x"))
    assert first.lease.token == 3 << EPOCH_SHIFT
    m.release("x", first.lease.lease_id)
    second = _granted(_acquire(m, "y"))
    assert second.lease.token == first.lease.token + 1
    assert m.table.token_bound("x") == second.lease.token  # forgotten: the group's bound
    primary.machines[LOCK].close()


async def test_replica_replays_to_the_same_state_and_a_new_epoch_tokens_higher() -> None:
    primary = _group("a", epoch=2, primary=True)
    replica = _group("b", epoch=2, primary=False)
    m = _machine(primary)
    kept = _granted(_acquire(m, "kept", ttl=5.0, owner="o1"))
    gone = _granted(_acquire(m, "gone"))
    m.release("gone", gone.lease.lease_id)
    m.refresh("kept", kept.lease.lease_id, 20 * SECOND)
    _replay(primary, replica)
    r = _machine(replica)
    assert r.table.to_snapshot() == m.table.to_snapshot()
    lease = r.table.lease("kept", kept.lease.lease_id)
    assert lease is not None and lease.ttl_ns == 20 * SECOND and lease.owner == "o1"
    assert lease == m.table.lease("kept", kept.lease.lease_id)  # to the nanosecond
    assert r.table.get("gone") is None

    # Failover: the replica leads epoch 5 and grants above every earlier token.
    replica.become_primary(5)
    other = _granted(_acquire(r, "other"))
    assert other.lease.token == 5 << EPOCH_SHIFT > kept.lease.token
    primary.machines[LOCK].close()
    replica.machines[LOCK].close()


async def test_promotion_gives_every_lease_a_full_ttl() -> None:
    clock = ManualClock()
    primary = _group("a", epoch=1, primary=True, clock=clock)
    replica = _group("b", epoch=1, primary=False, clock=clock)
    m = _machine(primary)
    grant = _granted(_acquire(m, "held", ttl=10.0))
    _replay(primary, replica)
    copy = _machine(replica).table.lease("held", grant.lease.lease_id)
    assert copy is not None
    copy.expire_ns = clock.wall_ns() - SECOND  # as if the old primary's clock ran ahead
    replica.become_primary(2)
    assert copy.expire_ns >= clock.wall_ns() + 9 * SECOND
    lease, _ = _machine(replica).refresh("held", grant.lease.lease_id, None)
    assert lease.token == grant.lease.token
    primary.machines[LOCK].close()
    replica.machines[LOCK].close()


async def test_waiters_fifo_and_expiry_hands_over() -> None:
    clock = ManualClock()
    primary = _group("a", epoch=1, primary=True, clock=clock)
    m = _machine(primary)
    held = _granted(_acquire(m, "q", ttl=0.05))
    w1 = _acquire(m, "q", wait=5, owner="w1")
    w2 = _acquire(m, "q", wait=5, owner="w2")
    assert isinstance(w1, Waiter) and isinstance(w2, Waiter)
    clock.advance(49 * MILLISECOND)
    assert not w1.future.done()
    clock.advance(1 * MILLISECOND)
    granted = await asyncio.wait_for(w1.future, 2)  # the 50 ms lease expired
    assert granted.lease.owner == "w1" and granted.lease.token > held.lease.token
    assert not w2.future.done()
    m.release("q", granted.lease.lease_id)
    assert (await asyncio.wait_for(w2.future, 1)).lease.owner == "w2"
    primary.machines[LOCK].close()


async def test_a_wall_clock_step_neither_ends_a_lease_early_nor_keeps_it_late() -> None:
    """Expiry is judged on the monotonic clock: the holder times its ttl on its own
    monotonic clock, and a wall clock stepped forward must not hand its lock to
    another while it still relies on it (nor one stepped back keep it held)."""
    clock = ManualClock()
    primary = _group("a", epoch=1, primary=True, clock=clock)
    m = _machine(primary)
    held = _granted(_acquire(m, "step", ttl=10.0))
    clock.jump(3600 * SECOND)  # an hour ahead, at once
    clock.advance(5 * SECOND)
    assert isinstance(_acquire(m, "step", wait=30, owner="next"), Waiter)
    assert m.live_leases("step") == [held.lease]
    lease, _ = m.refresh("step", held.lease.lease_id, None)  # still the holder's
    clock.jump(-7200 * SECOND)  # and now an hour behind where it began
    clock.advance(9 * SECOND)
    assert m.live_leases("step") == [lease]
    clock.advance(1 * SECOND)  # ten seconds after the refresh: over, whatever the wall says
    assert m.table.lease("step", held.lease.lease_id) is None and not m.queues
    [next_lease] = m.live_leases("step")  # the waiter's, granted at the expiry
    assert next_lease.owner == "next" and next_lease.token > held.lease.token
    primary.machines[LOCK].close()


async def test_queue_limit_and_leaving() -> None:
    primary = _group("a", epoch=1, primary=True)
    m = _machine(primary)
    held = _granted(_acquire(m, "full"))
    waiters = [_acquire(m, "full", wait=5) for _ in range(3)]
    with pytest.raises(ServiceError) as info:
        _acquire(m, "full", wait=5)
    assert info.value.reason == "TOO_MANY_WAITERS"
    first = waiters[0]
    assert isinstance(first, Waiter)
    m.leave("full", first)
    m.release("full", held.lease.lease_id)
    assert not first.future.done()
    second, third = waiters[1:]
    assert isinstance(second, Waiter) and second.future.done()
    primary.machines[LOCK].close()
    assert isinstance(third, Waiter) and isinstance(third.future.exception(), ServiceError)


async def test_a_retry_with_the_same_request_id_takes_the_waiters_place() -> None:
    primary = _group("a", epoch=1, primary=True)
    m = _machine(primary)
    held = _granted(_acquire(m, "r"))
    first = _acquire(m, "r", wait=5, request_id="req")
    behind = _acquire(m, "r", wait=5, request_id="other")
    retry = _acquire(m, "r", wait=5, request_id="req")
    assert isinstance(first, Waiter) and isinstance(retry, Waiter)
    assert isinstance(behind, Waiter)
    with pytest.raises(ServiceError):
        first.future.result()
    m.release("r", held.lease.lease_id)
    assert retry.future.done() and not behind.future.done()
    lease = retry.future.result().lease
    again = _granted(_acquire(m, "r", request_id="req"))
    assert again.lease is lease
    primary.machines[LOCK].close()
    assert isinstance(behind.future.exception(), ServiceError)


async def test_a_lease_handed_to_a_retry_outlives_the_first_try_going_away() -> None:
    """A client lost its first try and sent the request id again; the retry was
    handed the same lease (and may have answered with it) before the first try's
    cancellation arrived. Abandoning the first try must not end the lease."""
    primary = _group("a", epoch=1, primary=True)
    m = _machine(primary)
    first = _granted(_acquire(m, "r", request_id="req"))
    retry = _granted(_acquire(m, "r", request_id="req"))
    assert retry.lease is first.lease
    m.abandon("r", first.lease)  # the first try's call was cancelled
    assert m.table.lease("r", first.lease.lease_id) is first.lease
    m.release("r", retry.lease.lease_id)  # the client, holding it, lets go
    assert m.table.get("r") is None
    primary.machines[LOCK].close()


async def test_a_lease_ends_once_every_call_it_was_handed_to_went_away() -> None:
    primary = _group("a", epoch=1, primary=True)
    m = _machine(primary)
    once = _granted(_acquire(m, "once", request_id="one"))
    m.abandon("once", once.lease)
    assert m.table.get("once") is None
    later = _granted(_acquire(m, "once", request_id="one"))  # a retry after that
    assert later.lease.lease_id != once.lease.lease_id
    twice = _granted(_acquire(m, "twice", request_id="two"))
    _granted(_acquire(m, "twice", request_id="two"))
    m.abandon("twice", twice.lease)
    m.abandon("twice", twice.lease)
    assert m.table.get("twice") is None
    primary.machines[LOCK].close()


async def test_losing_the_primary_role_fails_waiters_and_stops_expiry() -> None:
    clock = ManualClock()
    primary = _group("a", epoch=1, primary=True, clock=clock)
    m = _machine(primary)
    _granted(_acquire(m, "s", ttl=0.05))
    waiter = _acquire(m, "s", wait=5)
    assert isinstance(waiter, Waiter)
    primary.step_down(2, "test")
    with pytest.raises(ServiceError) as info:
        waiter.future.result()
    assert info.value.reason == "GROUP_UNAVAILABLE"
    clock.advance(100 * MILLISECOND)
    assert m.table.get("s") is not None  # a replica never expires on its own
    primary.machines[LOCK].close()


async def test_the_lease_count_follows_grants_ends_and_departures() -> None:
    count = LeaseCount()
    clock = ManualClock()
    group = Group(9, "a", {LOCK: lambda g: LockMachine(g, LIMITS, count, clock)}, clock=clock)
    group.become_primary(1)
    m = _machine(group)
    a = _granted(_acquire(m, "a"))
    _granted(_acquire(m, "b", permits=2, max_permits=2))
    assert count.total == 2
    m.release("a", a.lease.lease_id)
    assert count.total == 1
    replica = Group(9, "b", {LOCK: lambda g: LockMachine(g, LIMITS, count, clock)},
                    clock=clock)
    epoch, seq, chunks = group.take_snapshot()
    replica.install(epoch, seq, chunks)
    assert count.total == 2  # both copies live on this (test) node
    group.close("test")
    replica.close("test")
    assert count.total == 0


async def test_readers_share_writers_queue_fairly() -> None:
    primary = _group("a", epoch=1, primary=True)
    replica = _group("b", epoch=1, primary=False)
    m = _machine(primary)
    r1 = _granted(_acquire(m, "rw", shared=True, owner="r1"))
    r2 = _granted(_acquire(m, "rw", shared=True, owner="r2"))
    writer = _acquire(m, "rw", wait=5, owner="w")
    late_reader = _acquire(m, "rw", wait=5, shared=True, owner="r3")  # behind the writer
    also_late = _acquire(m, "rw", wait=5, shared=True, owner="r4")
    assert isinstance(writer, Waiter) and isinstance(late_reader, Waiter)
    assert isinstance(also_late, Waiter)
    m.release("rw", r1.lease.lease_id)
    assert not writer.future.done()  # r2 still reads
    m.release("rw", r2.lease.lease_id)
    w = writer.future.result()
    assert not late_reader.future.done()
    m.release("rw", w.lease.lease_id)
    # Both readers behind the writer are granted together, with growing tokens.
    tokens = [late_reader.future.result().lease.token, also_late.future.result().lease.token]
    assert w.lease.token < tokens[0] < tokens[1]
    _replay(primary, replica)
    lock = _machine(replica).table.get("rw")
    assert lock is not None and lock.readers == 2 and lock.held == 0 and lock.available == 0
    primary.machines[LOCK].close()


def test_snapshot_round_trip() -> None:
    table = LockTable()
    snapshot = table.to_snapshot()
    assert LockTable().to_snapshot() == snapshot
    restored = LockTable()
    restored.load(snapshot)
    assert restored.last_token == 0 and not restored.locks
    assert rpb.SERVICE_KIND_LOCK == LOCK


async def test_describe_answers_what_it_read_once_that_is_committed() -> None:
    """Describe reads, then waits for what it read to commit: a grant not yet
    held by the replicas is not reported before it is, and once it is the answer
    stands even if the group is handed to another node as it commits (it read
    the machine, gone with the group, once, before the await: never INTERNAL)."""
    primary = _group("a", epoch=3, primary=True)
    tracker = replica_of(primary)
    _acquire(_machine(primary), "moving", owner="o")  # proposed, not yet committed
    service = LockService(LIMITS)
    service.start_routing(Here(primary))  # type: ignore[arg-type]
    context: Any = None  # only handed to the forwarder
    describe = asyncio.ensure_future(
        service.Describe(lock_pb.DescribeRequest(name="moving"), context))
    await asyncio.sleep(0)
    assert not describe.done()  # waits for the grant to commit
    tracker.on_ack(rpb.Ack(group_id=7, epoch=3, applied_epoch=3,
                           applied_seq=primary.log.last_seq, status=rpb.ACK_STATUS_OK))
    primary.close("the map moved the group to another node")
    answer = await asyncio.wait_for(describe, 1)
    assert [h.owner for h in answer.holders] == ["o"]

    # A grant decided while it waits is not in the answer: it is not committed.
    primary = _group("a", epoch=3, primary=True)
    tracker = replica_of(primary)
    _acquire(_machine(primary), "other", owner="o")
    service.start_routing(Here(primary))  # type: ignore[arg-type]
    describe = asyncio.ensure_future(
        service.Describe(lock_pb.DescribeRequest(name="later"), context))
    await asyncio.sleep(0)
    waited_for = primary.log.last_seq
    _acquire(_machine(primary), "later", owner="p")
    tracker.on_ack(rpb.Ack(group_id=7, epoch=3, applied_epoch=3,
                           applied_seq=waited_for, status=rpb.ACK_STATUS_OK))
    answer = await asyncio.wait_for(describe, 1)
    assert not answer.holders and answer.available_permits == 1
    primary.machines[LOCK].close()


async def test_validate_commits_through_the_replicas_so_a_deposed_primary_never_answers(
        ) -> None:
    """Validate is a fencing check: that its node still leads must not rest on
    that node's clock. It commits a no-op through the in-sync replicas first; one
    that knows a newer epoch refuses it, and Validate fails instead of calling
    the token valid."""
    primary = _group("a", epoch=3, primary=True)
    tracker = replica_of(primary)
    token = _granted(_acquire(_machine(primary), "fenced")).lease.token
    service = LockService(LIMITS)
    service.start_routing(Here(primary))  # type: ignore[arg-type]
    context: Any = None  # only handed to the forwarder
    request = lock_pb.ValidateRequest(name="fenced", fencing_token=token)

    def acked() -> rpb.Ack:
        return rpb.Ack(group_id=7, epoch=3, applied_epoch=3,
                       applied_seq=primary.log.last_seq, status=rpb.ACK_STATUS_OK)

    check = asyncio.ensure_future(service.Validate(request, context))
    await asyncio.sleep(0)
    assert not check.done()  # waits for the replica
    tracker.on_ack(acked())
    answer = await asyncio.wait_for(check, 1)
    assert answer.valid and answer.current_token == token

    deposed = asyncio.ensure_future(service.Validate(request, context))
    await asyncio.sleep(0)
    tracker.on_ack(rpb.Ack(group_id=7, status=rpb.ACK_STATUS_STALE_EPOCH, seen_epoch=4))
    with pytest.raises(MeshStatusError) as info:
        await deposed
    assert info.value.reason == "NOT_COMMITTED"
    primary.machines[LOCK].close()


async def test_a_batch_whose_group_is_deposed_keeps_the_grants_committed_before() -> None:
    """A batch waits for its group's last command only (commands commit in order);
    when the group is lost after committing part of the batch, the grants that
    were committed are answered as granted and only the rest fail NOT_COMMITTED."""
    primary = _group("a", epoch=3, primary=True)
    tracker = replica_of(primary)
    service = LockService(LIMITS)
    service.start_routing(Here(primary))  # type: ignore[arg-type]
    context: Any = None  # only handed to the forwarder
    request = lock_pb.AcquireBatchRequest(requests=[
        lock_pb.AcquireRequest(name=name, owner="o", request_id=f"r-{name}")
        for name in ("first", "second")])

    batch = asyncio.ensure_future(service.AcquireBatch(request, context))
    await asyncio.sleep(0)
    assert not batch.done()  # waits for the replica
    second = primary.log.last_seq  # the batch's two grants: second - 1, second
    tracker.on_ack(rpb.Ack(group_id=7, epoch=3, applied_epoch=3, applied_seq=second - 1,
                           status=rpb.ACK_STATUS_OK))
    await asyncio.sleep(0)
    assert not batch.done()  # the first is committed, the second is not
    tracker.on_ack(rpb.Ack(group_id=7, status=rpb.ACK_STATUS_STALE_EPOCH, seen_epoch=4))
    answer = await asyncio.wait_for(batch, 1)
    granted, lost = answer.outcomes
    assert granted.HasField("granted") and granted.granted.lease_id
    assert lost.HasField("error") and lost.error.reason == "NOT_COMMITTED"
    primary.machines[LOCK].close()
