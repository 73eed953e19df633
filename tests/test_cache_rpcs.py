"""Every cache RPC against a real node process, through the typed client."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2

from clients import (
    EventType,
    InvalidArgumentError,
    KeyExistsError,
    Mesh,
    VersionMismatchError,
)
from common.localmesh import LocalMesh
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc

Connect = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def mesh(shared_node: LocalMesh, mesh_client: Connect) -> Mesh:
    return await mesh_client(cluster=shared_node.cluster)


async def test_set_get_delete(mesh: Mesh) -> None:
    assert await mesh.cache.get("sgd:missing") is None
    v1 = await mesh.cache.set("sgd:k", b"one")
    assert await mesh.cache.get("sgd:k") == b"one"
    v2 = await mesh.cache.set("sgd:k", "two")
    assert v2 > v1
    entry = await mesh.cache.get_entry("sgd:k")
    assert entry is not None and entry.value == b"two" and entry.version == v2
    assert entry.expire_at is None
    assert await mesh.cache.delete("sgd:k") is True
    assert await mesh.cache.delete("sgd:k") is False
    assert await mesh.cache.get("sgd:k") is None


async def test_ttl_expiry(mesh: Mesh) -> None:
    ttl = 1.5  # room for a slow Set and Get on a loaded machine before it expires
    before = time.time()
    await mesh.cache.set("ttl:short", b"x", ttl=ttl)
    after = time.time()
    await mesh.cache.set("ttl:long", b"y", ttl=timedelta(minutes=5))
    entry = await mesh.cache.get_entry("ttl:short")
    assert entry is not None and entry.expire_at is not None
    # The node stamps the expiry (its wall clock, this machine's) while the Set runs.
    assert before + ttl <= entry.expire_at <= after + ttl, (before, entry.expire_at, after)
    await asyncio.sleep(max(0.0, entry.expire_at - time.time()) + 0.05)
    assert await mesh.cache.get("ttl:short") is None
    assert await mesh.cache.get("ttl:long") == b"y"
    # Overwriting without a TTL removes the TTL, as in Redis.
    await mesh.cache.set("ttl:long", b"z")
    entry = await mesh.cache.get_entry("ttl:long")
    assert entry is not None and entry.expire_at is None


async def test_expired_key_is_swept_and_reported(mesh: Mesh) -> None:
    async with mesh.cache.watch(keys=["sweep:k"]) as events:
        await mesh.cache.set("sweep:k", b"v", ttl=0.2)
        got = [await asyncio.wait_for(events.__aiter__().__anext__(), 5) for _ in range(2)]
    assert [e.type for e in got] == [EventType.SET, EventType.EXPIRE]


async def test_only_if_absent(mesh: Mesh) -> None:
    await mesh.cache.set("nx:k", b"first", only_if_absent=True)
    with pytest.raises(KeyExistsError) as info:
        await mesh.cache.set("nx:k", b"second", only_if_absent=True)
    assert info.value.reason == "KEY_EXISTS"
    assert await mesh.cache.get("nx:k") == b"first"
    # An expired key counts as absent.
    await mesh.cache.set("nx:t", b"old", ttl=0.1)
    await asyncio.sleep(0.2)
    await mesh.cache.set("nx:t", b"new", only_if_absent=True)
    assert await mesh.cache.get("nx:t") == b"new"


async def test_only_if_version_cas(mesh: Mesh) -> None:
    version = await mesh.cache.set("cas:k", b"a")
    newer = await mesh.cache.set("cas:k", b"b", only_if_version=version)
    with pytest.raises(VersionMismatchError) as info:
        await mesh.cache.set("cas:k", b"c", only_if_version=version)
    assert info.value.current_version == newer
    assert info.value.reason == "VERSION_MISMATCH"
    assert await mesh.cache.get("cas:k") == b"b"
    # Delete with a stale version fails, with the right one succeeds.
    with pytest.raises(VersionMismatchError):
        await mesh.cache.delete("cas:k", only_if_version=version)
    assert await mesh.cache.delete("cas:k", only_if_version=newer)
    # A version is never reused: re-creating the key does not revive old versions.
    recreated = await mesh.cache.set("cas:k", b"d")
    assert recreated > newer
    with pytest.raises(VersionMismatchError) as info:
        await mesh.cache.set("cas:missing", b"x", only_if_version=5)
    assert info.value.current_version == 0


async def test_concurrent_cas_increments_exactly_once_each(mesh: Mesh) -> None:
    await mesh.cache.set("cas:counter", b"0")

    async def bump() -> None:
        while True:
            entry = await mesh.cache.get_entry("cas:counter")
            assert entry is not None
            try:
                await mesh.cache.set("cas:counter", str(int(entry.value) + 1),
                                     only_if_version=entry.version)
                return
            except VersionMismatchError:
                continue

    await asyncio.gather(*(bump() for _ in range(20)))
    assert await mesh.cache.get("cas:counter") == b"20"


async def test_mget_mset(mesh: Mesh) -> None:
    versions = await mesh.cache.mset({"mm:a": b"1", "mm:b": "2", "mm:c": b"3"})
    assert len(versions) == 3 and all(v > 0 for v in versions)
    assert await mesh.cache.mget(["mm:a", "mm:missing", "mm:c", "mm:a"]) == [
        b"1", None, b"3", b"1"]
    await mesh.cache.mset([("mm:t", b"x")], ttl=0.1)
    await asyncio.sleep(0.2)
    assert await mesh.cache.mget(["mm:t", "mm:b"]) == [None, b"2"]


async def test_an_mget_answers_each_key_as_a_get_does(
        mesh: Mesh, shared_node: LocalMesh, channel_at: Callable[[str], grpc.aio.Channel]
) -> None:
    await mesh.cache.set("mge:ttl", b"x", ttl=60)
    await mesh.cache.set("mge:plain", b"y")
    stub = pb_grpc.CacheServiceStub(channel_at(shared_node.nodes[0].address))
    keys = ["mge:ttl", "mge:missing", "mge:plain"]
    many = await stub.MGet(pb.MGetRequest(keys=keys), timeout=5)
    ones = [await stub.Get(pb.GetRequest(key=k), timeout=5) for k in keys]
    assert list(many.results) == ones and not many.truncated
    assert ones[0].HasField("expire_time") and ones[0].version > 0 and not ones[1].found


async def test_large_mget_is_split_into_batches(mesh: Mesh) -> None:
    keys = [f"big:{i}" for i in range(2500)]
    await mesh.cache.mset({k: k for k in keys})
    values = await mesh.cache.mget(keys)
    assert values == [k.encode() for k in keys]


def _served(local: LocalMesh, method: str) -> float:
    """``method``'s calls the node has answered OK (from its /metrics)."""
    series = f'mesh_rpc_requests_total{{code="OK",method="/mesh.cache.v1.CacheService/{method}"}}'
    with urllib.request.urlopen(f"http://{local.nodes[0].metrics}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_concurrent_gets_travel_together_and_keep_their_own_answers(
    mesh: Mesh, shared_node: LocalMesh
) -> None:
    keys = [f"co:{i}" for i in range(64)]
    await mesh.cache.mset({k: k for k in keys[::2]})  # every other key exists
    gets = await asyncio.to_thread(_served, shared_node, "Get")
    mgets = await asyncio.to_thread(_served, shared_node, "MGet")
    values = await asyncio.gather(*(mesh.cache.get(k) for k in keys))
    assert values == [k.encode() if i % 2 == 0 else None for i, k in enumerate(keys)]
    entries = await asyncio.gather(*(mesh.cache.get_entry(k) for k in keys[:4]))
    assert [e.value if e else None for e in entries] == [b"co:0", None, b"co:2", None]
    # Two MGets (64 keys, then 4), not 68 Gets.
    assert await asyncio.to_thread(_served, shared_node, "MGet") == mgets + 2
    assert await asyncio.to_thread(_served, shared_node, "Get") == gets

    # A bad key fails its batch; every other call then goes alone and gets its answer.
    outcomes = await asyncio.gather(mesh.cache.get("co:0"), mesh.cache.get(""),
                                    mesh.cache.get("co:2"), return_exceptions=True)
    assert outcomes[0] == b"co:0" and outcomes[2] == b"co:2"
    assert isinstance(outcomes[1], InvalidArgumentError)

    # Without coalescing every get is its own call.
    mesh.cache.coalesce = False
    try:
        before = await asyncio.to_thread(_served, shared_node, "Get")
        await asyncio.gather(*(mesh.cache.get(k) for k in keys[:8]))
        assert await asyncio.to_thread(_served, shared_node, "Get") == before + 8
    finally:
        mesh.cache.coalesce = True


async def test_concurrent_sets_travel_together_and_keep_their_own_versions(
    mesh: Mesh, shared_node: LocalMesh
) -> None:
    keys = [f"cs:{i}" for i in range(32)]
    msets = await asyncio.to_thread(_served, shared_node, "MSet")
    sets = await asyncio.to_thread(_served, shared_node, "Set")
    versions = await asyncio.gather(*(mesh.cache.set(k, k, ttl=60) for k in keys))
    entries = await asyncio.gather(*(mesh.cache.get_entry(k) for k in keys))
    assert [(e.value, e.version) for e in entries if e] == [
        (k.encode(), v) for k, v in zip(keys, versions, strict=True)]
    assert all(e and e.expire_at for e in entries)
    assert await asyncio.to_thread(_served, shared_node, "MSet") == msets + 1
    assert await asyncio.to_thread(_served, shared_node, "Set") == sets

    # The same key twice in one turn: the second write is its own Set (an MSet
    # would merge them), so each gets its own version and the later one wins;
    # a conditional set never joins a batch.
    first, second, cas = await asyncio.gather(
        mesh.cache.set("cs:0", b"a"), mesh.cache.set("cs:0", b"b"),
        mesh.cache.set("cs:1", b"c", only_if_version=versions[1]))
    assert len({first, second}) == 2 and cas > versions[1]
    final = await mesh.cache.get_entry("cs:0")
    assert final is not None and (final.value, final.version) == (
        (b"b", second) if second > first else (b"a", first))

    # A value too large fails its batch; the others are written alone.
    small, large = await asyncio.gather(
        mesh.cache.set("cs:2", b"ok"), mesh.cache.set("cs:3", b"x" * (2 << 20)),
        return_exceptions=True)
    assert isinstance(small, int) and isinstance(large, InvalidArgumentError)
    assert await mesh.cache.get("cs:2") == b"ok"


async def test_incr(mesh: Mesh) -> None:
    assert await mesh.cache.incr("incr:n") == 1
    assert await mesh.cache.incr("incr:n", 41) == 42
    assert await mesh.cache.incr("incr:n", -50) == -8
    assert await mesh.cache.get("incr:n") == b"-8"
    await mesh.cache.set("incr:text", b"hello")
    with pytest.raises(InvalidArgumentError) as info:
        await mesh.cache.incr("incr:text")
    assert info.value.reason == "NOT_AN_INTEGER"
    assert "key" in info.value.field_violations
    await mesh.cache.set("incr:max", str(2**63 - 1))
    with pytest.raises(InvalidArgumentError) as info:
        await mesh.cache.incr("incr:max")
    assert info.value.reason == "INTEGER_OVERFLOW"
    assert await mesh.cache.get("incr:max") == str(2**63 - 1).encode()
    # The TTL applies on creation only.
    await mesh.cache.incr("incr:ttl", ttl=60)
    await mesh.cache.incr("incr:ttl", ttl=1)
    entry = await mesh.cache.get_entry("incr:ttl")
    assert entry is not None and entry.expire_at is not None
    assert entry.expire_at - time.time() > 50


async def test_concurrent_incr_is_atomic(mesh: Mesh) -> None:
    await asyncio.gather(*(mesh.cache.incr("incr:race") for _ in range(200)))
    assert await mesh.cache.get("incr:race") == b"200"


async def test_watch_keys_and_prefixes_in_order(mesh: Mesh) -> None:
    async with mesh.cache.watch(keys=["w:exact"], prefixes=["w:pre:"]) as events:
        await mesh.cache.set("w:exact", b"1")
        await mesh.cache.set("w:other", b"ignored")
        await mesh.cache.set("w:pre:a", b"2")
        await mesh.cache.incr("w:pre:n")
        await mesh.cache.delete("w:exact")
        it = events.__aiter__()
        got = [await asyncio.wait_for(it.__anext__(), 5) for _ in range(4)]
    assert [(e.type, e.key) for e in got] == [
        (EventType.SET, "w:exact"), (EventType.SET, "w:pre:a"),
        (EventType.SET, "w:pre:n"), (EventType.DELETE, "w:exact")]
    assert got[0].value == b"1" and got[2].value == b"1"
    # Versions order the changes of one key (keys of different groups have
    # unrelated revisions).
    assert got[0].revision < got[3].revision


async def test_watch_heartbeats_only_when_asked(
        shared_node: LocalMesh, mesh: Mesh,
        channel_at: Callable[[str], grpc.aio.Channel]) -> None:
    """Without heartbeat_interval a Watch carries none (older clients would read one
    as a change); with it, the created message gives the interval and an idle stream
    carries heartbeats numbered with the stream's last change."""
    stub = pb_grpc.CacheServiceStub(channel_at(shared_node.nodes[0].address))
    plain = stub.Watch(pb.WatchRequest(keys=["hb:k"]), timeout=30)
    created = await asyncio.wait_for(plain.read(), 5)
    assert created.created and not created.HasField("heartbeat_interval")
    asked = stub.Watch(pb.WatchRequest(keys=["hb:k"],
                                       heartbeat_interval=duration_pb2.Duration(seconds=1)),
                       timeout=30)
    created = await asyncio.wait_for(asked.read(), 5)
    assert created.created and created.heartbeat_interval.seconds == 1
    beat = await asyncio.wait_for(asked.read(), 3)
    assert beat.HasField("heartbeat") and beat.seq == 0 and not beat.HasField("event")
    await mesh.cache.set("hb:k", b"v")
    change = await asyncio.wait_for(asked.read(), 5)
    assert change.seq == 1 and change.event.key == "hb:k"
    beat = await asyncio.wait_for(asked.read(), 3)
    assert beat.HasField("heartbeat") and beat.seq == 1
    # The plain stream saw the change, and nothing else.
    change = await asyncio.wait_for(plain.read(), 5)
    assert change.seq == 1 and not change.HasField("heartbeat")
    plain.cancel()
    asked.cancel()


async def test_watch_needs_a_key(mesh: Mesh) -> None:
    with pytest.raises(InvalidArgumentError):
        async with mesh.cache.watch():
            pass


async def test_stats(mesh: Mesh) -> None:
    before = (await mesh.cache.stats())[0]
    await mesh.cache.set("stats:k", b"v")
    await mesh.cache.get("stats:k")
    await mesh.cache.get("stats:nothing")
    after = (await mesh.cache.stats())[0]
    assert after.hits == before.hits + 1
    assert after.misses == before.misses + 1
    assert after.entries == before.entries + 1
    assert after.revision >= before.revision
    assert after.eviction_policy == "lru"
    assert after.entries >= 1 and after.bytes > 0


async def test_linearizable_reads(mesh: Mesh, shared_node: LocalMesh,
                                  channel_at: Callable[[str], grpc.aio.Channel]) -> None:
    assert await mesh.cache.get("lin:k", linearizable=True) is None
    version = await mesh.cache.set("lin:k", b"one")
    assert await mesh.cache.get("lin:k", linearizable=True) == b"one"
    entry = await mesh.cache.get_entry("lin:k", linearizable=True)
    assert entry is not None and entry.version == version
    stub = pb_grpc.CacheServiceStub(channel_at(shared_node.nodes[0].address))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Get(pb.GetRequest(key="lin:k", consistency=7), timeout=5)  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "consistency" in (info.value.details() or "")
