"""The cache's one write path, without a network: the primary's store decides and
proposes each change to its group, which applies it at once through the same
`CacheMachine.apply` its replicas run; the replicas end up holding the same state."""

from __future__ import annotations

import gc

import grpc
import pytest

from common.clock import SECOND, ManualClock
from common.errors import ServiceError
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.cache.budget import Budget
from nodes.cache.machine import CACHE, CacheMachine, decode, encode
from nodes.cache.model import EXPIRE_AT, VERSION
from nodes.cache.store import (
    CacheFullError,
    CacheStore,
    Change,
    ChangeType,
    KeyExistsError,
    VersionMismatchError,
)
from nodes.replication.group import Group

T0 = 1_700_000_000 * SECOND


class NoClock:
    """A replica's clock: applying a change must never read it."""

    def __call__(self) -> int:
        pytest.fail("a replica read its clock")

    def wall_ns(self) -> int:
        return self()


def _group(node: str, clock: object, budget: Budget | None = None, policy: str = "lru",
           primary: bool = True, published: list[Change] | None = None) -> Group:
    feed = published.append if published is not None else (lambda change: None)
    budget = budget if budget is not None else Budget()

    def factory(g: Group) -> CacheMachine:
        return CacheMachine(g, budget, policy, feed, clock)  # type: ignore[arg-type]

    group = Group(1, node, {CACHE: factory}, clock=ManualClock(wall_ns=T0))
    if primary:
        group.become_primary(1)
    return group


def _store(group: Group) -> CacheStore:
    machine = group.machines[CACHE]
    assert isinstance(machine, CacheMachine)
    return machine.store


def _replay(primary: Group, replica: Group) -> None:
    """Ship the primary's log to the replica as the sender does."""
    epoch, seq = replica.applied
    batch = rpb.CommandBatch(group_id=1, epoch=primary.epoch, primary_node_id=primary.node_id,
                             prev_epoch=epoch, prev_seq=seq, in_sync=True,
                             commands=primary.log.since(seq, 100_000))
    assert replica.apply_batch(batch).status == rpb.ACK_STATUS_OK


def _changes(group: Group, after: int = 0) -> list[Change]:
    return [decode(c.payload) for c in group.log.since(after, 100_000) if c.service == CACHE]


@pytest.mark.parametrize("policy", ["lru", "lfu", "volatile-ttl", "noeviction"])
def test_replicas_applying_the_primarys_commands_hold_the_same_state(policy: str) -> None:
    clock = ManualClock(wall_ns=T0)
    published: list[Change] = []
    primary = _group("a", clock, Budget(max_entries=4), policy, published=published)
    replica = _group("b", NoClock(), Budget(max_entries=4), policy, primary=False)
    store = _store(primary)
    store.set("a", b"1")
    store.set("b", b"2", ttl=5 * SECOND)
    store.incr("n", 7)
    store.set("a", b"3")  # an overwrite: the policy counts it as a use on every copy
    store.delete("n")
    store.mset([("c", b"4", 5 * SECOND), ("d", b"5", None)])
    clock.advance(2 * SECOND)
    store.incr("c", 1)  # keeps its expiry
    if policy != "noeviction":
        store.set("e", b"6", ttl=10 * SECOND)  # full: evicts
    clock.advance(4 * SECOND)  # b and c are due
    assert store.get("b") is None  # expires it: a change like any other
    store.expire_due()
    _replay(primary, replica)
    copy = _store(replica)
    assert copy.export() == store.export()
    assert copy.revision == store.revision
    assert (copy._evictions, copy._expirations) == (store._evictions, store._expirations)
    assert [c.type for c in published].count(ChangeType.EXPIRE) == store._expirations >= 1
    assert store._evictions == (0 if policy == "noeviction" else 1)
    # Writes alone order the eviction candidates alike (reads stay local).
    assert list(copy._policy.candidates()) == list(store._policy.candidates())
    # Watchers saw every applied change, in the order the log holds them.
    assert published == _changes(primary)


def test_the_operation_result_is_what_was_applied() -> None:
    primary = _group("a", ManualClock(wall_ns=T0))
    store = _store(primary)
    entry = store.set("k", b"v", ttl=3 * SECOND)
    assert store.get("k") is entry
    assert entry[VERSION] == store.revision == 1
    assert _changes(primary) == [Change(ChangeType.SET, "k", b"v", 1, entry[EXPIRE_AT])]
    assert store.incr("n", 5) == (5, 2)
    assert store.mset([("x", b"1", None), ("y", b"2", None), ("x", b"3", None)]) == [4, 3, 4]
    seq = primary.log.last_seq
    assert primary.commit_seq == seq  # no replicas: committed at once


def test_a_live_read_proposes_nothing_and_an_expired_one_proposes_its_expiry() -> None:
    clock = ManualClock(wall_ns=T0)
    primary = _group("a", clock)
    store = _store(primary)
    store.set("k", b"v", ttl=SECOND)
    seq = primary.log.last_seq
    for _ in range(3):
        assert store.get("k") is not None
        assert store.get("missing") is None
    assert primary.log.last_seq == seq
    clock.advance(SECOND)
    assert store.get("k") is None
    assert _changes(primary, seq) == [Change(ChangeType.EXPIRE, "k", b"", 2, None)]


def test_an_operation_that_raises_proposes_nothing() -> None:
    primary = _group("a", ManualClock(wall_ns=T0), Budget(max_entries=2), "noeviction")
    store = _store(primary)
    store.set("a", b"1")
    store.set("b", b"2")
    seq, state = primary.log.last_seq, store.export()
    with pytest.raises(KeyExistsError):
        store.set("a", b"x", only_if_absent=True)
    with pytest.raises(VersionMismatchError):
        store.delete("a", only_if_version=7)
    with pytest.raises(CacheFullError):
        store.set("c", b"3")
    with pytest.raises(CacheFullError):
        store.mset([("c", b"3", None), ("a", b"4", None)])
    assert primary.log.last_seq == seq and store.export() == state


def test_room_is_made_by_proposed_removals_before_the_write() -> None:
    clock = ManualClock(wall_ns=T0)
    primary = _group("a", clock, Budget(max_entries=2))
    store = _store(primary)
    store.set("old", b"1", ttl=SECOND)
    store.set("live", b"2")
    clock.advance(SECOND)
    store.set("new", b"3")  # reclaims the expired key, evicts nothing
    store.set("newer", b"4")  # evicts the least recently used key
    assert [(c.type, c.key, c.revision) for c in _changes(primary, 2)] == [
        (ChangeType.EXPIRE, "old", 3), (ChangeType.SET, "new", 4),
        (ChangeType.EVICT, "live", 5), (ChangeType.SET, "newer", 6)]


def test_a_write_over_an_expired_key_expires_it_first() -> None:
    clock = ManualClock(wall_ns=T0)
    primary = _group("a", clock)
    replica = _group("b", NoClock(), primary=False)
    store = _store(primary)
    store.set("k", b"1", ttl=SECOND)
    clock.advance(SECOND)
    assert store.set("k", b"2")[VERSION] == 3
    assert [c.type for c in _changes(primary, 1)] == [ChangeType.EXPIRE, ChangeType.SET]
    _replay(primary, replica)
    assert _store(replica).export() == store.export()
    assert _store(replica)._expirations == 1


def test_another_group_of_the_node_evicts_through_its_own_group() -> None:
    budget = Budget(max_entries=2)
    clock = ManualClock(wall_ns=T0)
    one, two = _group("a", clock, budget), _group("a", clock, budget)
    budget.donors = lambda: [_store(one), _store(two)]
    _store(one).set("a", b"1")
    _store(one).set("b", b"2")
    _store(two).set("c", b"3")  # nothing to evict in two: one gives room
    assert [c.type for c in _changes(one)] == [ChangeType.SET, ChangeType.SET, ChangeType.EVICT]
    assert [c.type for c in _changes(two)] == [ChangeType.SET]
    assert budget.entries == 2


def test_a_group_no_longer_led_refuses_writes_and_changes_nothing() -> None:
    primary = _group("a", ManualClock(wall_ns=T0))
    store = _store(primary)
    store.set("k", b"v")
    primary.step_down(2, "a newer primary")
    seq, state = primary.log.last_seq, store.export()
    with pytest.raises(ServiceError) as exc:
        store.set("k", b"w")
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    assert primary.log.last_seq == seq and store.export() == state


def test_every_change_survives_the_wire() -> None:
    clock = ManualClock(wall_ns=T0 + 123_456_789)
    store = CacheStore(clock=clock.wall_ns)
    seen: list[Change] = []
    store.add_listener(seen.append)
    store.set("k", b"v", ttl=1_234_567_891)
    store.delete("k")
    store.set("é", b"\x00\xff")
    for change in seen:
        assert decode(encode(change)) == change


def test_restore_copies_a_snapshot_and_persists_nothing() -> None:
    primary = _group("a", ManualClock(wall_ns=T0))
    _store(primary).set("k", b"v", ttl=5 * SECOND)
    copy = _group("b", NoClock(), primary=False)
    machine = copy.machines[CACHE]
    assert not machine.restore(primary.machines[CACHE].snapshot())
    assert _store(copy).export() == _store(primary).export()


def test_a_snapshot_is_the_state_when_taken_though_made_piece_by_piece() -> None:
    primary = _group("a", ManualClock(wall_ns=T0))
    store = _store(primary)
    store.mset([(f"k{i:05d}", b"v" * 200, None) for i in range(6000)])  # > 2 pieces
    taken = store.export()
    pieces = iter(primary.machines[CACHE].snapshot())
    first = next(pieces)
    # Writes after the capture, while the rest is still being made: the entries
    # are read as their turn comes, so each must come out as it was.
    store.set("k00000", b"changed")
    store.set("k03000", b"once")
    store.set("k03000", b"twice")
    store.delete("k05999")
    store.delete("k04000")
    store.set("k04000", b"back")
    store.set("new", b"x")
    store.delete("new")
    store.set("newer", b"y")
    copy = _group("b", NoClock(), primary=False)
    rest = list(pieces)
    assert len(rest) >= 2
    copy.machines[CACHE].restore([first, *rest])
    revision, entries = _store(copy).export()
    assert (revision, dict(entries)) == (taken[0], dict(taken[1]))
    gc.collect()
    assert not store._captures  # read to the end: the store keeps no pre-images


def test_a_snapshot_abandoned_halfway_or_of_a_dropped_store_ends() -> None:
    primary = _group("a", ManualClock(wall_ns=T0))
    store = _store(primary)
    store.mset([(f"k{i:05d}", b"v" * 200, None) for i in range(6000)])
    pieces = iter(primary.machines[CACHE].snapshot())
    next(pieces)
    assert len(store._captures) == 1
    del pieces  # the stream ended halfway
    assert not store._captures
    store.set("k00001", b"w")  # and nothing more is kept for it
    unread = iter(primary.machines[CACHE].snapshot())
    next(unread)
    store.release()  # the group left this node
    with pytest.raises(RuntimeError, match="dropped"):
        list(unread)


def test_a_snapshot_installs_a_piece_at_a_time_and_one_closed_halfway_finishes_at_once(
) -> None:
    primary = _group("a", ManualClock(wall_ns=T0))
    store = _store(primary)
    store.mset([(f"k{i:05d}", b"v" * 200, None) for i in range(6000)])
    epoch, seq, taken = primary.take_snapshot()
    chunks = list(taken)
    assert len(chunks) >= 3

    copy = _group("b", NoClock(), primary=False)
    steps = copy.installing(epoch, seq, chunks)
    next(steps)
    assert 0 < len(_store(copy).export()[1]) < 6000  # the first piece only
    steps.close()  # e.g. the group moved on meanwhile: never left half, nor empty
    assert copy.applied == (epoch, seq)
    assert _store(copy).export() == store.export()

    assert sum(1 for _ in copy.installing(epoch, seq, chunks)) == len(chunks)
    assert copy.applied == (epoch, seq)
    assert _store(copy).export() == store.export()
