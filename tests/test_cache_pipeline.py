"""``mesh.cache.pipeline()`` on three real nodes: results in order, each its own
error, one key's commands in queue order, and batched (MGet/MSet per node, not
a call per command), even on a client with coalescing off."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable

import pytest

from clients import KeyExistsError, Mesh, VersionMismatchError
from common.localmesh import LocalMesh

Connect = Callable[..., Awaitable[Mesh]]


def _calls(cluster: LocalMesh, method: str) -> float:
    """Calls of CacheService ``method`` served by every node so far (their /metrics)."""
    total = 0.0
    for node in cluster.nodes:
        with urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("mesh_rpc_requests_total{") and \
                        f'method="/mesh.cache.v1.CacheService/{method}"' in line:
                    total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_pipeline_batches_by_node_and_keeps_each_result(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster, coalesce=False)
    keys = [f"pipe:{i}" for i in range(300)]
    before = {m: await asyncio.to_thread(_calls, shared_cluster, m)
              for m in ("Get", "Set", "MGet", "MSet")}
    p = mesh.cache.pipeline()
    for i, key in enumerate(keys):
        p.set(key, f"v{i}")
    assert len(p) == 300
    versions = await p.execute()
    assert len(versions) == 300 and all(isinstance(v, int) and v > 0 for v in versions)
    for key in keys:
        p.get(key)
    p.get("pipe:missing")
    values = await p.execute()
    assert values == [f"v{i}".encode() for i in range(300)] + [None]
    after = {m: await asyncio.to_thread(_calls, shared_cluster, m)
             for m in ("Get", "Set", "MGet", "MSet")}
    # 600 commands over three nodes: a few batch calls, not a call each.
    assert after["Get"] - before["Get"] + after["Set"] - before["Set"] < 10
    assert 0 < after["MSet"] - before["MSet"] <= 10
    assert 0 < after["MGet"] - before["MGet"] <= 10

    # Linearizable gets batch too, as linearizable MGets.
    for key in keys[:100]:
        p.get(key, linearizable=True)
    assert await p.execute() == [f"v{i}".encode() for i in range(100)]
    last = {m: await asyncio.to_thread(_calls, shared_cluster, m) for m in ("Get", "MGet")}
    assert last["Get"] == after["Get"] and 0 < last["MGet"] - after["MGet"] <= 10


async def test_one_keys_commands_apply_in_order_and_errors_stay_in_place(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    await mesh.cache.set("pipe:taken", "old")
    p = mesh.cache.pipeline()
    (p.set("pipe:seq", "1").get("pipe:seq").set("pipe:seq", "2").get("pipe:seq")
     .incr("pipe:n").incr("pipe:n", 5)
     .set("pipe:taken", "new", only_if_absent=True)
     .set("pipe:other", "x", only_if_version=99)
     .delete("pipe:seq").get("pipe:seq"))
    results = await p.execute(raise_on_error=False)
    assert results[1] == b"1" and results[3] == b"2"
    assert results[4:6] == [1, 6]
    assert isinstance(results[6], KeyExistsError)
    assert isinstance(results[7], VersionMismatchError)
    assert results[8] is True and results[9] is None
    assert await mesh.cache.get("pipe:taken") == b"old"
    # By default the first error is raised once every command has run.
    p.set("pipe:taken", "again", only_if_absent=True).set("pipe:after", "ran")
    with pytest.raises(KeyExistsError):
        await p.execute()
    assert await mesh.cache.get("pipe:after") == b"ran"
