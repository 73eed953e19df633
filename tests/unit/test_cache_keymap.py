"""The cache's sharded structures: `KeyMap`, `RecencyOrder` and the expiry index
over them, against plain dicts doing the same, with shards small enough to split
many times in each test."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from common.clock import SECOND, ManualClock
from nodes.cache import keymap
from nodes.cache.budget import Budget
from nodes.cache.keymap import KeyMap
from nodes.cache.model import EXPIRE_AT
from nodes.cache.recency import RecencyOrder
from nodes.cache.store import CacheStore

T0 = 1_700_000_000 * SECOND


def test_a_map_splits_a_shard_at_a_time_and_no_shard_outgrows_twice_its_share() -> None:
    m: KeyMap[int] = KeyMap(shard_keys=64)
    splits: list[tuple[int, int]] = []
    m.on_split(lambda old, new: splits.append((old, new)))
    for i in range(20_000):
        m[f"k{i}"] = i
        assert len(splits) == max(0, -(-len(m) // 64) - 1)  # one split per 64 keys
    assert len(m.shards) == len(splits) + 1
    assert max(len(shard) for shard in m.shards) <= 4 * 64  # linear hashing: ~2x its share
    assert [new for _, new in splits] == list(range(1, len(m.shards)))
    for i in range(20_000):
        key = f"k{i}"
        assert m[key] == i and m.shards[m.index(key)][key] == i


def test_a_map_behaves_as_a_dict_through_splits() -> None:
    rng = random.Random(7)
    m: KeyMap[int] = KeyMap(shard_keys=3)
    ref: dict[str, int] = {}
    for step in range(30_000):
        key = f"k{rng.randrange(2_000)}"
        op = rng.random()
        if op < 0.55:
            m[key] = ref[key] = step
        elif op < 0.75:
            assert m.pop(key, None) == ref.pop(key, None)
        elif op < 0.85 and key in ref:
            del m[key]
            del ref[key]
        else:
            assert m.get(key) == ref.get(key)
            assert (key in m) == (key in ref)
        assert len(m) == len(ref)
    assert dict(m.items()) == ref
    assert sorted(m) == sorted(ref)
    with pytest.raises(KeyError):
        m.pop("absent")
    with pytest.raises(KeyError):
        _ = m["absent"]
    shards = len(m.shards)
    m.clear()
    assert len(m) == 0 and list(m) == [] and len(m.shards) == shards  # kept, empty


def test_a_split_keeps_each_shards_order() -> None:
    m: KeyMap[int] = KeyMap(OrderedDict, shard_keys=4)
    for i in range(1_000):
        m[f"k{i}"] = i
    for shard in m.shards:
        assert list(shard.values()) == sorted(shard.values())


def test_recency_order_is_exact_across_shards() -> None:
    rng = random.Random(11)
    order = RecencyOrder(shard_keys=4)
    ref: OrderedDict[str, None] = OrderedDict()
    for _ in range(20_000):
        key = f"k{rng.randrange(500)}"
        op = rng.random()
        if op < 0.6:
            order.use(key)
            ref[key] = None
            ref.move_to_end(key)
        elif op < 0.8:
            order.discard(key)
            ref.pop(key, None)
        elif op < 0.97:
            assert order.oldest() == next(iter(ref), None)
        else:
            assert list(order) == list(ref)
        assert len(order) == len(ref) and (key in order) == (key in ref)
    assert list(order) == list(ref)
    while ref:  # evict everything, oldest first
        oldest = order.oldest()
        assert oldest == next(iter(ref))
        order.discard(oldest)
        del ref[oldest]
    assert order.oldest() is None and list(order) == []


def test_recency_items_stay_bounded_when_a_shard_empties_and_fills_again() -> None:
    order = RecencyOrder(shard_keys=4)
    for _ in range(10_000):  # never asked for the oldest: nothing else drops items
        order.use("only")
        order.discard("only")
    assert len(order._firsts._heap) <= 2 * len(order._keys.shards) + 9


def test_a_sharded_store_expires_exactly_what_one_dict_would(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keymap, "SHARD_KEYS", 4)
    rng = random.Random(3)
    clock = ManualClock(wall_ns=T0)
    store = CacheStore(clock=clock.wall_ns)
    expiry: dict[str, int | None] = {}  # what the store should hold: key -> expire_at
    for step in range(20_000):
        key = f"k{rng.randrange(800)}"
        op = rng.random()
        if op < 0.5:
            ttl = rng.choice([None, 1, 2, 5, 30]) if op < 0.45 else None
            entry = store.set(key, b"v", ttl=None if ttl is None else ttl * SECOND)
            expiry[key] = entry[EXPIRE_AT]
        elif op < 0.6:
            store.delete(key)
            expiry.pop(key, None)
        elif op < 0.7:
            clock.advance(rng.randrange(SECOND))
        elif op < 0.75:
            now = clock.wall_ns()
            due = {k for k, at in expiry.items() if at is not None and at <= now}
            assert store.expire_due() == len(due)
            for k in due:
                del expiry[k]
        now = clock.wall_ns()
        live = [at for at in expiry.values() if at is not None]
        assert store.next_expiry() == (min(live) if live else None), step
        assert len(store) == sum(1 for at in expiry.values() if at is None or at > now)
    # Stale items are dropped heap by heap: each stays within twice its live ones.
    index = store._expiry
    assert len(index._heaps) == len(store._data.shards) > 50
    for heap, held in zip(index._heaps, index._live, strict=True):
        assert len(heap) <= 2 * held + 64
    assert index._volatile == sum(index._live) == sum(
        1 for at in expiry.values() if at is not None)


@pytest.mark.parametrize("seed", range(3))
def test_a_capture_read_between_random_writes_is_the_state_when_taken(
        monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.setattr(keymap, "SHARD_KEYS", 4)
    rng = random.Random(seed)
    store = CacheStore(clock=ManualClock(wall_ns=T0).wall_ns)
    for i in range(2_000):
        store.set(f"k{i}", b"%d" % i)
    taken = dict(store.export()[1])
    shards = len(store._data.shards)
    capture = store.capture()
    read: dict[str, tuple[bytes, int, int | None]] = {}
    items = capture.items()
    for entry in items:
        key, value = entry
        assert key not in read  # each key once
        read[key] = value
        for _ in range(rng.randrange(4)):  # writes between the reads
            key = f"k{rng.randrange(3_000)}"  # a third of them new keys
            if rng.random() < 0.7:
                store.set(key, b"new")
            else:
                store.delete(key)
    assert read == taken
    assert len(store._data.shards) == shards  # held while the capture was read
    store.set("one more", b"x")
    assert len(store._data.shards) == shards + 1 and store._data.holds == 0


def test_an_abandoned_capture_lets_the_map_split_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keymap, "SHARD_KEYS", 4)
    store = CacheStore()
    for i in range(100):
        store.set(f"k{i}", b"v")
    items = store.capture().items()
    next(items)
    shards = len(store._data.shards)
    for i in range(100, 200):
        store.set(f"k{i}", b"v")
    assert len(store._data.shards) == shards and store._data.holds == 1
    del items  # the snapshot stream ended halfway
    assert store._data.holds == 0
    for i in range(200, 300):
        store.set(f"k{i}", b"v")
    assert len(store._data.shards) == -(-300 // 4)  # caught up: one split per new key


@pytest.mark.parametrize("policy", ["lru", "lfu", "volatile-ttl"])
def test_a_released_store_gives_everything_back_at_once(
        monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    # A store lives in reference cycles (its machine's propose): what release
    # left behind would wait for a full garbage collection.
    monkeypatch.setattr(keymap, "SHARD_KEYS", 4)
    budget = Budget(0, 0)
    store = CacheStore(policy=policy, budget=budget, clock=ManualClock(wall_ns=T0).wall_ns)
    for i in range(500):
        store.set(f"k{i}", b"v", ttl=60 * SECOND if i % 2 else None)
    store.release()
    assert (budget.entries, budget.bytes) == (0, 0)
    assert len(store._data) == 0 and len(store._expiry) == 0
    assert len(store._policy) == 0 and store._policy.victim() is None
    assert store.next_expiry() is None
