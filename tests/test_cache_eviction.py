"""Each eviction policy under memory pressure, on a real node with small limits.

Eviction order is kept per replica group, so the policy tests run a one-group
cluster (``--groups 1``) to see the node-wide order; the last test shows that
with many groups a write still finds room in the other groups the node leads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from clients import EventType, Mesh, ResourceExhaustedError

Connect = Callable[..., Awaitable[Mesh]]


async def _node(local_mesh: Any, mesh_client: Connect, policy: str, groups: int = 1,
                **limits: int) -> Mesh:
    extra = ["--cache-eviction", policy]
    for name, value in limits.items():
        extra += [f"--cache-{name.replace('_', '-')}", str(value)]
    local_mesh(1, extra=extra, coordinator_extra=["--groups", str(groups)])
    return await mesh_client()


async def test_lru_keeps_recently_used(local_mesh: Any, mesh_client: Connect) -> None:
    mesh = await _node(local_mesh, mesh_client, "lru", max_entries=10)
    for i in range(10):
        await mesh.cache.set(f"k{i}", b"v")
    await mesh.cache.get("k0")  # k0 is now the most recently used
    async with mesh.cache.watch(prefixes=["k"]) as events:
        await mesh.cache.set("k10", b"v")
        it = events.__aiter__()
        seen = [await it.__anext__() for _ in range(2)]
    assert (seen[0].type, seen[0].key) == (EventType.EVICT, "k1")
    assert (seen[1].type, seen[1].key) == (EventType.SET, "k10")
    assert await mesh.cache.get("k0") == b"v"
    assert await mesh.cache.get("k1") is None
    stats = (await mesh.cache.stats())[0]
    assert stats.entries == 10 and stats.evictions == 1


async def test_lfu_keeps_frequently_used(local_mesh: Any, mesh_client: Connect) -> None:
    mesh = await _node(local_mesh, mesh_client, "lfu", max_entries=5)
    for i in range(5):
        await mesh.cache.set(f"f{i}", b"v")
    for i in (0, 1, 3, 4):  # f2 is read least
        for _ in range(3):
            await mesh.cache.get(f"f{i}")
    await mesh.cache.set("f5", b"v")
    assert await mesh.cache.get("f2") is None
    assert await mesh.cache.mget([f"f{i}" for i in (0, 1, 3, 4, 5)]) == [b"v"] * 5


async def test_max_bytes_is_respected(local_mesh: Any, mesh_client: Connect) -> None:
    mesh = await _node(local_mesh, mesh_client, "lru", max_bytes=20_000)
    for i in range(100):
        await mesh.cache.set(f"b{i:03}", b"x" * 1000)
    stats = (await mesh.cache.stats())[0]
    assert stats.bytes <= 20_000
    assert stats.evictions > 70
    # The newest keys survive, the oldest were evicted.
    assert await mesh.cache.get("b099") is not None
    assert await mesh.cache.get("b000") is None
    # A value that can never fit is refused without evicting anything.
    with pytest.raises(ResourceExhaustedError) as info:
        await mesh.cache.set("huge", b"x" * 30_000)
    assert info.value.reason == "CACHE_FULL"
    assert (await mesh.cache.stats())[0].evictions == stats.evictions


async def test_volatile_ttl_evicts_soonest_expiring(
    local_mesh: Any, mesh_client: Connect
) -> None:
    mesh = await _node(local_mesh, mesh_client, "volatile-ttl", max_entries=4)
    await mesh.cache.set("perm1", b"v")
    await mesh.cache.set("perm2", b"v")
    await mesh.cache.set("late", b"v", ttl=600)
    await mesh.cache.set("soon", b"v", ttl=300)
    await mesh.cache.set("new1", b"v")  # evicts "soon", never a key without TTL
    assert await mesh.cache.get("soon") is None
    assert await mesh.cache.mget(["perm1", "perm2", "late", "new1"]) == [b"v"] * 4
    await mesh.cache.set("new2", b"v", ttl=900)  # evicts "late"
    assert await mesh.cache.get("late") is None
    await mesh.cache.set("new3", b"v")  # evicts "new2": the only volatile key left
    assert await mesh.cache.get("new2") is None
    # Only keys without a TTL remain: nothing may be evicted, so the write fails.
    with pytest.raises(ResourceExhaustedError) as info:
        await mesh.cache.set("new4", b"v")
    assert info.value.reason == "CACHE_FULL"
    assert await mesh.cache.mget(["perm1", "perm2", "new1", "new3"]) == [b"v"] * 4


async def test_noeviction_refuses_writes(local_mesh: Any, mesh_client: Connect) -> None:
    mesh = await _node(local_mesh, mesh_client, "noeviction", max_entries=3)
    await mesh.cache.mset({"a": b"1", "b": b"2", "c": b"3"})
    with pytest.raises(ResourceExhaustedError):
        await mesh.cache.set("d", b"4")
    # Overwriting an existing key needs no room and still works.
    await mesh.cache.set("a", b"one")
    assert await mesh.cache.mget(["a", "b", "c", "d"]) == [b"one", b"2", b"3", None]


async def test_a_full_node_evicts_from_its_other_groups(
    local_mesh: Any, mesh_client: Connect
) -> None:
    mesh = await _node(local_mesh, mesh_client, "lru", groups=256, max_entries=20)
    for i in range(200):  # spread over many groups: most writes meet an empty group
        await mesh.cache.set(f"spread{i}", b"v")
    stats = (await mesh.cache.stats())[0]
    assert stats.entries == 20 and stats.evictions == 180
    assert await mesh.cache.get("spread199") == b"v"
