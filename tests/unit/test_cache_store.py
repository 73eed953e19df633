"""Unit tests for the cache state machine and its eviction policies."""

from __future__ import annotations

import gc
import random
from typing import Any

import pytest

from common.clock import MILLISECOND, SECOND, ManualClock, from_seconds
from nodes.cache import keymap
from nodes.cache.eviction import (
    POLICY_NAMES,
    LFUPolicy,
    LRUPolicy,
    NoEvictionPolicy,
    VolatileTTLPolicy,
    make_policy,
)
from nodes.cache.expiry import ExpiryIndex
from nodes.cache.keymap import KeyMap
from nodes.cache.model import EXPIRE_AT, VALUE, VERSION
from nodes.cache.store import (
    ENTRY_OVERHEAD,
    CacheError,
    CacheFullError,
    CacheStore,
    Change,
    ChangeType,
    IntegerOverflowError,
    KeyExistsError,
    NotAnIntegerError,
    VersionMismatchError,
)

S = SECOND
MS = MILLISECOND
T0 = 1_700_000_000 * S
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


@pytest.fixture(autouse=True, params=["one shard", "4-key shards"])
def shards(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs twice: on maps of one shard, as small stores are, and of
    4-key shards, so that shards split in the middle of what each test does."""
    if request.param == "4-key shards":
        monkeypatch.setattr(keymap, "SHARD_KEYS", 4)


def size(key: str, value: bytes) -> int:
    return len(key.encode()) + len(value) + ENTRY_OVERHEAD


class Recorder:
    def __init__(self, store: CacheStore) -> None:
        self.changes: list[Change] = []
        self.unsubscribe = store.add_listener(self.changes.append)

    def kinds(self) -> list[tuple[ChangeType, str]]:
        return [(c.type, c.key) for c in self.changes]

    def clear(self) -> None:
        self.changes.clear()


def make(**kwargs: object) -> tuple[CacheStore, ManualClock, Recorder]:
    clock = ManualClock(wall_ns=T0)
    store = CacheStore(clock=clock.wall_ns, **kwargs)  # type: ignore[arg-type]
    return store, clock, Recorder(store)


def keys_present(store: CacheStore, keys: list[str]) -> set[str]:
    """Which of ``keys`` are live (reads them, so it counts hits and touches them)."""
    return {k for k in keys if store.get(k) is not None}


# -- basics --------------------------------------------------------------------


def test_get_missing_is_none_and_counts_a_miss() -> None:
    store, _, rec = make()
    assert store.get("nope") is None
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.revision) == (0, 1, 0)
    assert rec.changes == []


def test_set_then_get_returns_entry_with_version_equal_to_revision() -> None:
    store, _, rec = make()
    entry = store.set("a", b"1")
    assert entry == (b"1", 1, None)
    assert store.get("a") == entry
    assert store.revision == 1
    assert rec.changes == [Change(ChangeType.SET, "a", b"1", 1, None)]
    assert store.stats().hits == 1


def test_the_garbage_collector_stops_walking_entries() -> None:
    """Each full collection walks every object the collector tracks: held as
    class instances, a million entries stalled a node for 100 ms. Held as
    tuples of bytes and ints they are dropped from its lists at the first
    collection that sees them (snapshot restores and replicas' copies alike)."""
    store, _, _ = make()
    store.set("a", b"1")
    store.set("b", b"2", ttl=10 * S)
    replica, _, _ = make()
    replica.load(*store.export())
    gc.collect()
    for copy in (store, replica):
        entries = [copy.get(key) for key in ("a", "b")]
        assert all(e is not None and not gc.is_tracked(e) for e in entries), entries


def test_overwrite_replaces_value_and_ttl() -> None:
    store, clock, _ = make()
    first = store.set("a", b"1", ttl=10 * S)
    assert first[EXPIRE_AT] == T0 + 10 * S
    second = store.set("a", b"2")
    assert second[EXPIRE_AT] is None
    assert second[VERSION] > first[VERSION]
    clock.advance(100 * S)
    got = store.get("a")
    assert got is not None and got[VALUE] == b"2"
    third = store.set("a", b"3", ttl=5 * S)
    assert third[EXPIRE_AT] == T0 + 105 * S


@pytest.mark.parametrize("ttl", [None, 0, 0.0])
def test_no_ttl_means_no_expiry(ttl: Any) -> None:
    store, clock, _ = make()
    assert store.set("a", b"1", ttl=ttl)[EXPIRE_AT] is None
    clock.advance(10**9 * S)
    assert store.get("a") is not None
    assert store.next_expiry() is None


@pytest.mark.parametrize("ttl", [-1, -1 * MS, float("nan"), float("inf")])
def test_bad_ttl_raises_value_error_without_change(ttl: Any) -> None:
    store, _, rec = make()
    with pytest.raises(ValueError):
        store.set("a", b"1", ttl=ttl)
    with pytest.raises(ValueError):
        store.mset([("b", b"1", None), ("c", b"1", ttl)])
    with pytest.raises(ValueError):
        store.incr("d", 1, ttl=ttl)
    assert store.revision == 0 and len(store) == 0 and rec.changes == []


def test_conditions_cannot_be_combined_and_versions_cannot_be_negative() -> None:
    store, _, _ = make()
    with pytest.raises(ValueError):
        store.set("a", b"1", only_if_absent=True, only_if_version=3)
    with pytest.raises(ValueError):
        store.set("a", b"1", only_if_version=-1)
    with pytest.raises(ValueError):
        store.delete("a", only_if_version=-1)


def test_delete() -> None:
    store, _, rec = make()
    store.set("a", b"1")
    assert store.delete("a") is True
    assert store.get("a") is None
    assert store.delete("a") is False
    assert rec.changes[-1] == Change(ChangeType.DELETE, "a", b"", 2, None)
    assert store.revision == 2  # the failed delete changed nothing


def test_errors_share_one_base() -> None:
    for cls in (
        KeyExistsError,
        VersionMismatchError,
        CacheFullError,
        NotAnIntegerError,
        IntegerOverflowError,
    ):
        assert issubclass(cls, CacheError)


def test_memory_accounting_uses_encoded_key_and_overhead() -> None:
    store, _, _ = make()
    store.set("a", b"xyz")
    store.set("é€", b"")  # 2 + 3 UTF-8 bytes
    assert store.stats().bytes == (1 + 3 + 64) + (5 + 0 + 64)
    store.set("a", b"")  # overwrite frees the old size
    assert store.stats().bytes == (1 + 0 + 64) + (5 + 0 + 64)
    store.delete("é€")
    assert store.stats().bytes == 65
    assert store.stats().entries == 1 == len(store)


def test_invalid_construction() -> None:
    with pytest.raises(ValueError):
        CacheStore(policy="random")
    with pytest.raises(ValueError):
        CacheStore(max_entries=-1)
    with pytest.raises(ValueError):
        CacheStore(max_bytes=-1)


# -- TTL -----------------------------------------------------------------------


def test_lazy_expiry_on_get_emits_expire_and_never_returns_value() -> None:
    store, clock, rec = make()
    store.set("a", b"1", ttl=10 * S)
    clock.advance(9_999 * MS)
    assert store.get("a") is not None
    clock.advance(1 * MS)  # exactly at expire_at: expired
    assert store.get("a") is None
    assert rec.kinds() == [(ChangeType.SET, "a"), (ChangeType.EXPIRE, "a")]
    assert rec.changes[-1] == Change(ChangeType.EXPIRE, "a", b"", 2, None)
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.expirations, stats.entries, stats.bytes) == (
        1,
        1,
        1,
        0,
        0,
    )
    assert store.get("a") is None
    assert store.revision == 2  # a second miss does not expire again


def test_expired_keys_excluded_from_stats_and_len_before_sweep() -> None:
    store, clock, rec = make()
    store.set("a", b"1", ttl=5 * S)
    store.set("b", b"22", ttl=50 * S)
    store.set("c", b"333")
    clock.advance(10 * S)
    stats = store.stats()
    assert stats.entries == 2 == len(store)
    assert stats.bytes == size("b", b"22") + size("c", b"333")
    assert store.revision == 3 and len(rec.changes) == 3  # reading stats changed nothing


def test_active_expiry_in_expiry_order_with_limit() -> None:
    store, clock, rec = make()
    store.set("late", b"1", ttl=30 * S)
    store.set("early", b"1", ttl=10 * S)
    store.set("mid", b"1", ttl=20 * S)
    store.set("forever", b"1")
    assert store.next_expiry() == T0 + 10 * S
    assert store.expire_due() == 0
    clock.advance(25 * S)
    rec.clear()
    assert store.expire_due(max_keys=1) == 1
    assert rec.kinds() == [(ChangeType.EXPIRE, "early")]
    assert store.expire_due() == 1
    assert rec.kinds() == [(ChangeType.EXPIRE, "early"), (ChangeType.EXPIRE, "mid")]
    assert store.next_expiry() == T0 + 30 * S
    clock.advance(10 * S)
    assert store.expire_due() == 1
    assert store.next_expiry() is None
    assert store.stats().expirations == 3
    assert store.get("forever") is not None
    assert store.expire_due(max_keys=0) == 0


def test_active_expiry_skips_stale_heap_entries() -> None:
    store, clock, rec = make()
    store.set("rewritten", b"1", ttl=5 * S)
    store.set("rewritten", b"2", ttl=100 * S)  # later expiry now
    store.set("persisted", b"1", ttl=5 * S)
    store.set("persisted", b"2")  # no expiry now
    store.set("deleted", b"1", ttl=5 * S)
    store.delete("deleted")
    store.set("recreated", b"1", ttl=5 * S)
    store.delete("recreated")
    store.set("recreated", b"2", ttl=200 * S)
    assert store.next_expiry() == T0 + 100 * S
    clock.advance(10 * S)
    rec.clear()
    assert store.expire_due() == 0
    assert rec.changes == []
    assert {k for k in ("rewritten", "persisted", "recreated") if store.get(k)} == {
        "rewritten",
        "persisted",
        "recreated",
    }


def test_expiry_heap_is_compacted_under_repeated_rewrites() -> None:
    store, clock, _ = make()
    for i in range(10_000):
        store.set("k", b"%d" % i, ttl=(1000 + i) * S)
    assert len(store._expiry) < 200  # lazy deletion does not leak
    clock.advance((1000 + 10_000) * S)
    assert store.expire_due() == 1


def test_next_expiry_skips_removed_keys() -> None:
    store, _, _ = make()
    assert store.next_expiry() is None
    store.set("a", b"1", ttl=1 * S)
    store.set("b", b"1", ttl=2 * S)
    store.delete("a")
    assert store.next_expiry() == T0 + 2 * S


def test_only_if_absent_treats_expired_key_as_absent() -> None:
    store, clock, rec = make()
    store.set("a", b"old", ttl=1 * S)
    clock.advance(1 * S)
    entry = store.set("a", b"new", only_if_absent=True)
    assert entry[VALUE] == b"new"
    assert rec.kinds()[-2:] == [(ChangeType.EXPIRE, "a"), (ChangeType.SET, "a")]
    assert store.stats().expirations == 1


def test_only_if_version_on_expired_key_mismatches_with_zero() -> None:
    store, clock, rec = make()
    version = store.set("a", b"1", ttl=1 * S)[VERSION]
    clock.advance(2 * S)
    with pytest.raises(VersionMismatchError) as info:
        store.set("a", b"2", only_if_version=version)
    assert info.value.current_version == 0
    with pytest.raises(VersionMismatchError) as info:
        store.delete("a", only_if_version=version)
    assert info.value.current_version == 0
    assert store.revision == 1 and len(rec.changes) == 1


def test_delete_of_expired_key_returns_false_and_sweeps_it() -> None:
    store, clock, rec = make()
    store.set("a", b"1", ttl=1 * S)
    clock.advance(1 * S)
    assert store.delete("a") is False
    assert rec.kinds()[-1] == (ChangeType.EXPIRE, "a")
    assert store.stats().expirations == 1


# -- compare-and-set and versions -------------------------------------------------


def test_only_if_absent_on_live_key_raises_and_changes_nothing() -> None:
    store, _, rec = make()
    store.set("a", b"1")
    with pytest.raises(KeyExistsError):
        store.set("a", b"2", only_if_absent=True)
    got = store.get("a")
    assert got is not None and got[VALUE] == b"1"
    assert store.revision == 1 and len(rec.changes) == 1
    assert store.set("b", b"1", only_if_absent=True)[VERSION] == 2


def test_only_if_version() -> None:
    store, _, _ = make()
    v1 = store.set("a", b"1")[VERSION]
    v2 = store.set("a", b"2", only_if_version=v1)[VERSION]
    assert v2 > v1
    with pytest.raises(VersionMismatchError) as info:
        store.set("a", b"3", only_if_version=v1)
    assert info.value.current_version == v2
    got = store.get("a")
    assert got is not None and got[VALUE] == b"2"
    with pytest.raises(VersionMismatchError) as info:
        store.set("missing", b"1", only_if_version=7)
    assert info.value.current_version == 0
    assert store.get("missing") is None


def test_conditional_delete() -> None:
    store, _, _ = make()
    v1 = store.set("a", b"1")[VERSION]
    v2 = store.set("a", b"2")[VERSION]
    with pytest.raises(VersionMismatchError) as info:
        store.delete("a", only_if_version=v1)
    assert info.value.current_version == v2
    assert store.get("a") is not None
    assert store.delete("a", only_if_version=v2) is True
    with pytest.raises(VersionMismatchError) as info:
        store.delete("a", only_if_version=v2)
    assert info.value.current_version == 0


def test_versions_strictly_increase_and_are_not_reused_after_delete() -> None:
    store, _, _ = make()
    seen = [store.set("a", b"1")[VERSION]]
    store.delete("a")
    seen.append(store.set("a", b"1")[VERSION])
    seen.append(store.set("b", b"1")[VERSION])
    seen.append(store.incr("c", 1)[1])
    seen.extend(store.mset([("a", b"x", None), ("d", b"y", None)]))
    seen.append(store.set("a", b"z")[VERSION])
    assert seen == [1, 3, 4, 5, 6, 7, 8]
    assert seen == sorted(set(seen))


# -- mset ---------------------------------------------------------------------------


def test_mset_returns_versions_in_order_and_emits_sets() -> None:
    store, clock, rec = make()
    versions = store.mset([("a", b"1", None), ("b", b"2", 10 * S), ("c", b"3", 0)])
    assert versions == [1, 2, 3]
    assert rec.changes == [
        Change(ChangeType.SET, "a", b"1", 1, None),
        Change(ChangeType.SET, "b", b"2", 2, T0 + 10 * S),
        Change(ChangeType.SET, "c", b"3", 3, None),
    ]
    clock.advance(10 * S)
    assert store.get("b") is None
    assert store.mset([]) == []


def test_mset_duplicate_key_last_wins() -> None:
    store, _, rec = make()
    versions = store.mset([("a", b"first", None), ("b", b"x", None), ("a", b"last", 5 * S)])
    got = store.get("a")
    assert got is not None and got[VALUE] == b"last" and got[EXPIRE_AT] == T0 + 5 * S
    assert versions[0] == versions[2] == got[VERSION]
    assert versions == [2, 1, 2]
    assert rec.kinds() == [(ChangeType.SET, "b"), (ChangeType.SET, "a")]


def test_mset_that_cannot_fit_changes_nothing_noeviction() -> None:
    one = size("k0", b"v")
    store, _, rec = make(max_bytes=3 * one, policy="noeviction")
    store.mset([("k0", b"v", None), ("k1", b"v", None)])
    before = (store.revision, store.stats())
    with pytest.raises(CacheFullError):
        store.mset([("k2", b"v", None), ("k3", b"v", None)])
    assert (store.revision, store.stats()) == before
    assert store.get("k2") is None and store.get("k3") is None
    assert len(rec.changes) == 2


def test_mset_bigger_than_limits_evicts_nothing_lru() -> None:
    store, _, rec = make(max_entries=3, max_bytes=10_000, policy="lru")
    store.mset([("a", b"1", None), ("b", b"1", None), ("c", b"1", None)])
    rec.clear()
    with pytest.raises(CacheFullError):  # 4 distinct keys can never fit in 3
        store.mset([("w", b"1", None), ("x", b"1", None), ("y", b"1", None), ("z", b"1", None)])
    with pytest.raises(CacheFullError):  # one entry above max_bytes
        store.mset([("w", b"1", None), ("x", b"v" * 10_000, None)])
    assert rec.changes == []
    assert keys_present(store, ["a", "b", "c", "w", "x"]) == {"a", "b", "c"}


def test_mset_evicts_other_keys_not_its_own() -> None:
    store, _, rec = make(max_entries=3, policy="lru")
    store.mset([("a", b"1", None), ("b", b"1", None), ("c", b"1", None)])
    rec.clear()
    # "a" is the LRU key but is part of the batch: b and ... only b must go.
    store.mset([("a", b"2", None), ("d", b"1", None)])
    assert rec.kinds() == [(ChangeType.EVICT, "b"), (ChangeType.SET, "a"), (ChangeType.SET, "d")]
    assert keys_present(store, ["a", "b", "c", "d"]) == {"a", "c", "d"}


# -- incr ---------------------------------------------------------------------------


def test_incr_creates_at_zero_with_ttl() -> None:
    store, clock, _ = make()
    assert store.incr("n", 5, ttl=10 * S) == (5, 1)
    got = store.get("n")
    assert got == (b"5", 1, T0 + 10 * S)
    clock.advance(10 * S)
    assert store.get("n") is None
    assert store.incr("n", -3) == (-3, 3)  # expired key starts over, without ttl
    got = store.get("n")
    assert got is not None and got[EXPIRE_AT] is None and got[VALUE] == b"-3"


def test_incr_existing_keeps_expiry_and_ignores_ttl() -> None:
    store, _, _ = make()
    store.set("n", b"41", ttl=100 * S)
    assert store.incr("n", 1, ttl=5 * S) == (42, 2)
    got = store.get("n")
    assert got == (b"42", 2, T0 + 100 * S)
    assert store.incr("n", -50) == (-8, 3)
    assert store.incr("n", 0) == (-8, 4)


@pytest.mark.parametrize(
    "raw",
    [
        b"abc",
        b"1.5",
        b"",
        b" 1",
        b"1 ",
        b"+1",
        b"1_000",
        b"0x10",
        b"--1",
        b"9" * 20,
        b"9223372036854775808",
        b"-9223372036854775809",
        "٣".encode(),
    ],
)
def test_incr_non_integer_raises_and_changes_nothing(raw: bytes) -> None:
    store, _, rec = make()
    store.set("n", raw)
    with pytest.raises(NotAnIntegerError):
        store.incr("n", 1)
    got = store.get("n")
    assert got is not None and got[VALUE] == raw and got[VERSION] == 1
    assert len(rec.changes) == 1


def test_incr_accepts_boundaries_and_detects_overflow() -> None:
    store, _, rec = make()
    store.set("hi", str(INT64_MAX - 1).encode())
    assert store.incr("hi", 1)[0] == INT64_MAX
    with pytest.raises(IntegerOverflowError):
        store.incr("hi", 1)
    store.set("lo", str(INT64_MIN).encode())
    with pytest.raises(IntegerOverflowError):
        store.incr("lo", -1)
    assert store.incr("lo", INT64_MAX) == (-1, 4)
    assert store.incr("fresh", INT64_MAX) == (INT64_MAX, 5)
    n_changes = len(rec.changes)
    with pytest.raises(IntegerOverflowError):
        store.incr("fresh", 1)
    got = store.get("fresh")
    assert got is not None and got[VALUE] == str(INT64_MAX).encode()
    assert len(rec.changes) == n_changes
    with pytest.raises(ValueError):
        store.incr("x", INT64_MAX + 1)


# -- eviction: LRU ------------------------------------------------------------------


def test_lru_max_entries_touched_key_survives() -> None:
    store, _, rec = make(max_entries=3, policy="lru")
    for k in "abc":
        store.set(k, b"1")
    assert store.get("a") is not None
    rec.clear()
    store.set("d", b"1")
    assert rec.kinds() == [(ChangeType.EVICT, "b"), (ChangeType.SET, "d")]
    assert rec.changes[0] == Change(ChangeType.EVICT, "b", b"", 4, None)
    store.set("e", b"1")
    assert keys_present(store, list("abcde")) == {"a", "d", "e"}
    assert store.stats().evictions == 2


def test_lru_max_bytes_evicts_as_many_as_needed() -> None:
    one = size("a", b"x" * 10)
    store, _, rec = make(max_bytes=4 * one, policy="lru")
    for k in "abcd":
        store.set(k, b"x" * 10)
    store.get("a")
    rec.clear()
    big = b"x" * (one + 10)  # needs two small entries' room
    store.set("e", big)
    assert rec.kinds() == [(ChangeType.EVICT, "b"), (ChangeType.EVICT, "c"), (ChangeType.SET, "e")]
    assert store.stats().bytes == 2 * one + size("e", big) <= 4 * one


def test_lru_overwrite_at_capacity_does_not_evict() -> None:
    store, _, rec = make(max_entries=2, max_bytes=2 * size("a", b"12"), policy="lru")
    store.set("a", b"12")
    store.set("b", b"12")
    rec.clear()
    store.set("a", b"34")  # same size; "a" is the LRU key and must not evict itself
    assert rec.kinds() == [(ChangeType.SET, "a")]
    store.set("b", b"345")  # one byte more: "a" must go, never "b" itself
    assert rec.kinds()[-2:] == [(ChangeType.EVICT, "a"), (ChangeType.SET, "b")]


def test_entry_larger_than_max_bytes_is_rejected_without_evicting() -> None:
    store, _, rec = make(max_bytes=1000, policy="lru")
    for k in "abc":
        store.set(k, b"x" * 100)
    before = store.stats()
    rec.clear()
    with pytest.raises(CacheFullError):
        store.set("big", b"x" * 1000)
    with pytest.raises(CacheFullError):
        store.set("a", b"x" * 1000)  # overwrite too: "a" keeps its old value
    assert rec.changes == [] and store.stats() == before
    got = store.get("a")
    assert got is not None and got[VALUE] == b"x" * 100


def test_expired_keys_are_reclaimed_before_live_keys() -> None:
    store, clock, rec = make(max_entries=3, policy="lru")
    store.set("live1", b"1")
    store.set("dying", b"1", ttl=5 * S)
    store.set("live2", b"1")
    store.get("dying")  # most recently used, but it will expire
    clock.advance(5 * S)
    rec.clear()
    store.set("new", b"1")
    assert rec.kinds() == [(ChangeType.EXPIRE, "dying"), (ChangeType.SET, "new")]
    stats = store.stats()
    assert (stats.evictions, stats.expirations) == (0, 1)


def test_noeviction_write_succeeds_after_reclaiming_expired_keys() -> None:
    store, clock, rec = make(max_entries=2, policy="noeviction")
    store.set("a", b"1", ttl=1 * S)
    store.set("b", b"1")
    with pytest.raises(CacheFullError):
        store.set("c", b"1")
    clock.advance(1 * S)
    store.set("c", b"1")
    assert rec.kinds()[-2:] == [(ChangeType.EXPIRE, "a"), (ChangeType.SET, "c")]


# -- eviction: LFU ------------------------------------------------------------------


def test_lfu_frequently_read_key_survives() -> None:
    store, _, rec = make(max_entries=3, policy="lfu")
    for k in "abc":
        store.set(k, b"1")
    for _ in range(3):
        store.get("a")
    store.get("c")
    rec.clear()
    store.set("d", b"1")  # b: freq 1 (least), c: 2, a: 4
    assert rec.kinds()[0] == (ChangeType.EVICT, "b")
    store.set("e", b"1")  # d: freq 1 is now the least used
    assert rec.kinds()[2] == (ChangeType.EVICT, "d")
    assert keys_present(store, list("abcde")) == {"a", "c", "e"}


def test_lfu_ties_go_to_least_recently_used() -> None:
    store, _, rec = make(max_entries=3, policy="lfu")
    for k in "abc":
        store.set(k, b"1")
    store.get("b")
    store.get("a")
    store.get("c")  # all at freq 2; b was used longest ago
    rec.clear()
    store.set("d", b"1")
    store.get("d")
    store.get("d")  # d: freq 3
    store.set("e", b"1")  # among freq 2 (a, c): a is older
    assert [k for t, k in rec.kinds() if t is ChangeType.EVICT] == ["b", "a"]


def test_lfu_max_bytes_and_removal_of_the_minimum() -> None:
    one = size("a", b"1")
    store, _, rec = make(max_bytes=3 * one, policy="lfu")
    for k in "abc":
        store.set(k, b"1")
    store.get("b")
    store.get("c")
    store.get("c")
    store.delete("a")  # the only freq-1 key goes; the next minimum is b (freq 2)
    store.set("d", b"1")
    store.get("d")
    store.get("d")
    store.get("d")
    rec.clear()
    store.set("e", b"1" * 2)  # needs a whole entry plus one byte: b (freq 2), then c (3)
    assert [k for t, k in rec.kinds() if t is ChangeType.EVICT] == ["b", "c"]
    assert store.stats().bytes <= 3 * one


# -- eviction: volatile-ttl ----------------------------------------------------------


def test_volatile_ttl_evicts_soonest_expiry_and_never_persistent_keys() -> None:
    store, _, rec = make(max_entries=4, policy="volatile-ttl")
    store.set("persist", b"1")
    store.set("t100", b"1", ttl=100 * S)
    store.set("t10", b"1", ttl=10 * S)
    store.set("t50", b"1", ttl=50 * S)
    store.get("t10")  # reads do not matter for this policy
    rec.clear()
    store.set("new1", b"1")
    store.set("new2", b"1", ttl=1 * S)
    store.set("new3", b"1")
    evicted = [k for t, k in rec.kinds() if t is ChangeType.EVICT]
    assert evicted == ["t10", "t50", "new2"]
    assert keys_present(store, ["persist", "t100", "new1", "new3"]) == {
        "persist",
        "t100",
        "new1",
        "new3",
    }
    store.set("new4", b"1")
    assert rec.kinds()[-2] == (ChangeType.EVICT, "t100")
    # Only persistent keys are left: a new key cannot get room.
    before = (store.revision, store.stats())
    n = len(rec.changes)
    with pytest.raises(CacheFullError):
        store.set("new5", b"1", ttl=5 * S)
    assert (store.revision, store.stats()) == before and len(rec.changes) == n
    store.set("persist", b"2")  # an overwrite needs no room
    assert store.revision == before[0] + 1


def test_volatile_ttl_follows_expiry_changes() -> None:
    store, _, rec = make(max_entries=3, policy="volatile-ttl")
    store.set("a", b"1", ttl=10 * S)
    store.set("b", b"1", ttl=20 * S)
    store.set("c", b"1", ttl=30 * S)
    store.set("a", b"1", ttl=40 * S)  # a now expires last
    store.set("b", b"1")  # b is no longer volatile
    rec.clear()
    store.set("d", b"1")
    assert rec.kinds()[0] == (ChangeType.EVICT, "c")
    store.set("e", b"1")
    assert rec.kinds()[2] == (ChangeType.EVICT, "a")
    with pytest.raises(CacheFullError):
        store.set("f", b"1")


def test_volatile_ttl_max_bytes_cache_full_when_only_persistent_keys_can_go() -> None:
    one = size("a", b"x" * 50)
    store, _, rec = make(max_bytes=3 * one, policy="volatile-ttl")
    store.set("a", b"x" * 50)
    store.set("b", b"x" * 50, ttl=5 * S)
    store.set("c", b"x" * 50)
    rec.clear()
    with pytest.raises(CacheFullError):  # needs two entries' room; only b can go
        store.set("d", b"x" * (one + 50))
    assert rec.changes == []
    store.set("d", b"x" * 50)
    assert rec.kinds() == [(ChangeType.EVICT, "b"), (ChangeType.SET, "d")]


# -- eviction: noeviction -----------------------------------------------------------


def test_noeviction_raises_and_leaves_state_untouched() -> None:
    store, _, rec = make(max_entries=2, policy="noeviction")
    store.set("a", b"1")
    store.set("b", b"1")
    before = (store.revision, store.stats())
    rec.clear()
    with pytest.raises(CacheFullError):
        store.set("c", b"1")
    with pytest.raises(CacheFullError):
        store.incr("n", 1)
    assert (store.revision, store.stats()) == before
    assert rec.changes == []
    assert store.get("c") is None
    store.set("a", b"2")  # overwriting fits
    store.delete("b")
    store.set("c", b"1")  # deleting made room
    assert keys_present(store, ["a", "b", "c"]) == {"a", "c"}
    assert store.stats().evictions == 0


def test_noeviction_max_bytes_growth_of_existing_key() -> None:
    store, _, _ = make(max_bytes=size("a", b"x" * 10), policy="noeviction")
    store.set("a", b"x" * 10)
    with pytest.raises(CacheFullError):
        store.set("a", b"x" * 11)
    store.set("a", b"y" * 5)
    got = store.get("a")
    assert got is not None and got[VALUE] == b"y" * 5


# -- listeners -----------------------------------------------------------------------


def test_listener_sees_changes_in_revision_order_after_state_update() -> None:
    store, clock, _ = make(max_entries=2, policy="lru")
    seen: list[tuple[int, bool, int]] = []

    def listener(change: Change) -> None:
        # State is already updated: a SET's key is readable, revision caught up.
        present = change.key in store._data
        seen.append((change.revision, present, store.revision))

    store.add_listener(listener)
    store.set("a", b"1", ttl=1 * S)
    store.set("b", b"1")
    clock.advance(1 * S)
    store.set("c", b"1")  # reclaims expired "a"
    store.set("d", b"1")  # evicts "b"
    assert [r for r, _, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert [p for _, p, _ in seen] == [True, True, False, True, False, True]
    assert seen[2][2] == 4 and seen[4][2] == 6  # delivered after the whole operation


def test_unsubscribe_stops_delivery_and_is_idempotent() -> None:
    store, _, rec = make()
    other: list[Change] = []
    unsubscribe = store.add_listener(other.append)
    store.set("a", b"1")
    unsubscribe()
    unsubscribe()
    store.set("b", b"1")
    assert [c.key for c in other] == ["a"]
    assert [c.key for c in rec.changes] == ["a", "b"]
    rec.unsubscribe()
    store.set("c", b"1")
    assert len(rec.changes) == 2


def test_reentrant_listener_keeps_revision_order_for_everyone() -> None:
    store, _, _ = make()
    first: list[int] = []
    second: list[int] = []

    def writer(change: Change) -> None:
        first.append(change.revision)
        if change.key == "trigger":
            store.set("echo", b"1")

    store.add_listener(writer)
    store.add_listener(lambda c: second.append(c.revision))
    store.mset([("trigger", b"1", None), ("other", b"1", None)])
    assert first == second == [1, 2, 3]


def test_failing_listener_does_not_break_the_operation_or_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, _, rec = make()

    def boom(change: Change) -> None:
        raise RuntimeError("listener bug")

    store.add_listener(boom)
    entry = store.set("a", b"1")
    assert entry[VERSION] == 1
    assert [c.key for c in rec.changes] == ["a"]
    assert "listener" in caplog.text


# -- stats ----------------------------------------------------------------------------


def test_stats_counters() -> None:
    store, clock, _ = make(max_entries=2, max_bytes=10_000, policy="lfu")
    store.set("a", b"1")
    store.set("b", b"22", ttl=5 * S)
    store.get("a")
    store.get("a")
    store.get("zz")
    store.set("c", b"333")  # evicts b (least used)
    clock.advance(5 * S)
    store.set("d", b"4", ttl=1 * S)  # evicts c
    clock.advance(1 * S)
    store.get("d")  # expired
    stats = store.stats()
    assert stats.entries == 1
    assert stats.bytes == size("a", b"1")
    assert (stats.max_entries, stats.max_bytes, stats.policy) == (2, 10_000, "lfu")
    assert (stats.hits, stats.misses) == (2, 2)
    assert (stats.evictions, stats.expirations) == (2, 1)
    assert stats.revision == store.revision == 7


# -- policies directly -----------------------------------------------------------------


def test_make_policy_names() -> None:
    expiry = ExpiryIndex(KeyMap())
    assert POLICY_NAMES == ("lru", "lfu", "volatile-ttl", "noeviction")
    assert isinstance(make_policy("lru", expiry), LRUPolicy)
    assert isinstance(make_policy("LFU", expiry), LFUPolicy)
    assert isinstance(make_policy("volatile-ttl", expiry), VolatileTTLPolicy)
    assert isinstance(make_policy("volatile_ttl", expiry), VolatileTTLPolicy)
    assert isinstance(make_policy("noeviction", expiry), NoEvictionPolicy)
    with pytest.raises(ValueError):
        make_policy("allkeys-random", expiry)
    assert make_policy("lru", expiry) is not make_policy("lru", expiry)


def test_policies_with_no_keys_offer_no_victim() -> None:
    for name in POLICY_NAMES:
        policy = make_policy(name, ExpiryIndex(KeyMap()))
        assert policy.victim() is None
        assert list(policy.candidates()) == []
        policy.on_remove("unknown")  # ignored


def test_lru_policy_order() -> None:
    p = LRUPolicy()
    for k in "abc":
        p.on_insert(k)
    p.on_access("a")
    p.on_insert("b")  # a write is a use
    assert list(p.candidates()) == ["c", "a", "b"]
    p.on_remove("c")
    assert p.victim() == "a" and len(p) == 2


def test_lfu_policy_order_and_frequency() -> None:
    p = LFUPolicy()
    for k in "abcd":
        p.on_insert(k)
    p.on_access("a")
    p.on_access("a")
    p.on_access("c")
    p.on_insert("d")  # overwrite counts as a use
    assert [p.frequency(k) for k in "abcd"] == [3, 1, 2, 2]
    assert list(p.candidates()) == ["b", "c", "d", "a"]
    p.on_remove("b")
    assert p.victim() == "c"
    p.on_remove("c")
    p.on_remove("d")
    assert p.victim() == "a"
    p.on_remove("a")
    assert p.victim() is None and len(p) == 0 and p.frequency("a") == 0
    p.on_insert("z")
    assert p.victim() == "z" and p.frequency("z") == 1


def test_volatile_policy_order() -> None:
    # The policy reads the store's expiry index: the store's writes drive it.
    store, _, _ = make(policy="volatile-ttl")
    p = store._policy
    store.set("persistent", b"1")
    store.set("a", b"1", ttl=30 * S)
    store.set("b", b"1", ttl=10 * S)
    store.set("c", b"1", ttl=20 * S)
    store.set("d", b"1", ttl=10 * S)  # same expiry as b: by key
    store.set("a", b"1", ttl=5 * S)
    assert list(p.candidates()) == ["a", "b", "d", "c"]
    store.set("a", b"1")  # no expiry any more
    assert p.victim() == "b" and len(p) == 3
    store.delete("b")
    assert p.victim() == "d"
    for _ in range(1000):
        store.set("c", b"1", ttl=20 * S)
    assert len(store._expiry) < 200
    assert list(p.candidates()) == ["d", "c"]


def test_volatile_policy_drops_stale_entries_before_walking() -> None:
    store, _, _ = make(policy="volatile-ttl")
    for i in range(1000):
        store.set(f"k{i}", b"1", ttl=(i + 1) * S)
    for i in range(999):
        store.delete(f"k{i}")  # what eviction of the soonest keys leaves behind
    assert list(store._policy.candidates()) == ["k999"]
    # Later walks do not pay for the removed keys again.
    assert len(store._expiry) == 1


def test_noeviction_policy() -> None:
    p = NoEvictionPolicy()
    p.on_insert("a", 1 * S)
    p.on_access("a")
    assert p.victim() is None and len(p) == 0


# -- a randomised model check ------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_invariants(policy: str, seed: int) -> None:
    """Replaying the change stream rebuilds the store; limits always hold."""
    rng = random.Random(seed)
    max_entries, max_bytes = 12, 12 * 90
    store, clock, rec = make(max_entries=max_entries, max_bytes=max_bytes, policy=policy)
    replica: dict[str, tuple[bytes, int, float | None]] = {}
    applied = 0
    keys = [f"k{i}" for i in range(20)]

    def sync() -> None:
        nonlocal applied
        for change in rec.changes[applied:]:
            applied += 1
            assert change.revision == applied
            if change.type is ChangeType.SET:
                replica[change.key] = (change.value, change.revision, change.expire_at)
            else:
                assert change.key in replica
                del replica[change.key]

    for _ in range(1500):
        op = rng.random()
        key = rng.choice(keys)
        ttl = rng.choice([None, None, 1 * S, 5 * S, 20 * S])
        try:
            if op < 0.35:
                store.set(key, b"v" * rng.randrange(0, 40), ttl=ttl)
            elif op < 0.6:
                entry = store.get(key)
                if entry is not None:
                    assert replica[key] == (entry[VALUE], entry[VERSION], entry[EXPIRE_AT])
                    assert entry[EXPIRE_AT] is None or entry[EXPIRE_AT] > clock.wall_ns()
            elif op < 0.7:
                store.delete(key)
            elif op < 0.8:
                batch = [(rng.choice(keys), b"m" * rng.randrange(0, 30), ttl) for _ in range(3)]
                versions = store.mset(batch)
                sync()
                for (k, _, _), version in zip(batch, versions, strict=True):
                    assert replica[k][1] == version
            elif op < 0.88:
                store.incr(key, rng.randrange(-5, 6), ttl=ttl)
            elif op < 0.95:
                clock.advance(from_seconds(rng.random() * 3))
            else:
                store.expire_due(rng.randrange(1, 4))
        except (CacheFullError, NotAnIntegerError):
            pass
        sync()
        held_bytes = sum(size(k, v) for k, (v, _, _) in replica.items())
        assert len(replica) <= max_entries and held_bytes <= max_bytes
        live = {k: v for k, v in replica.items() if v[2] is None or v[2] > clock.wall_ns()}
        stats = store.stats()
        assert stats.entries == len(live) == len(store)
        assert stats.bytes == sum(size(k, v) for k, (v, _, _) in live.items())
        assert stats.revision == applied
    stats = store.stats()
    assert stats.hits + stats.misses > 0
    if policy != "noeviction":
        assert stats.evictions > 0
