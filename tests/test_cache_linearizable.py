"""Linearizable reads of many keys on three real nodes (R = 1): an MGet with
``consistency`` LINEARIZABLE, and concurrent ``get(linearizable=True)`` calls,
which the typed client coalesces into such MGets (one no-op per group instead
of one per key). That a deposed primary never answers one is
`test_partitions.py`'s cut-from-etcd scenario."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest

from clients import Mesh
from common.localmesh import LocalMesh
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc
from tests.test_cache_pipeline import _calls

Connect = Callable[..., Awaitable[Mesh]]
LINEARIZABLE = pb.READ_CONSISTENCY_LINEARIZABLE


async def test_concurrent_linearizable_gets_share_mgets_and_read_every_write(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    keys = [f"lin-many:{i}" for i in range(60)]
    versions = await mesh.cache.mset([(k, f"v{i}") for i, k in enumerate(keys)])
    asked = [*keys, "lin-many:missing", keys[0]]
    expected = [*(f"v{i}".encode() for i in range(len(keys))), None, b"v0"]

    gets = await asyncio.to_thread(_calls, shared_cluster, "Get")
    mgets = await asyncio.to_thread(_calls, shared_cluster, "MGet")
    assert await asyncio.gather(*(mesh.cache.get(k, linearizable=True) for k in asked)) \
        == expected
    assert await asyncio.to_thread(_calls, shared_cluster, "Get") == gets  # none alone
    assert 1 <= await asyncio.to_thread(_calls, shared_cluster, "MGet") - mgets <= 3

    entries = await asyncio.gather(*(mesh.cache.get_entry(k, linearizable=True)
                                     for k in keys[:5]))
    assert [e.version if e else None for e in entries] == versions[:5]
    # The same reads through mget, then a write each read must see at once.
    assert await mesh.cache.mget(asked, linearizable=True) == expected
    await mesh.cache.set(keys[1], b"after")
    assert (await mesh.cache.mget(keys[:2], linearizable=True))[1] == b"after"


async def test_a_node_forwards_a_linearizable_mget_and_says_how_it_read(
    shared_cluster: LocalMesh, mesh_client: Connect,
    channel_at: Callable[[str], grpc.aio.Channel],
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    keys = [f"lin-fwd:{i}" for i in range(30)]  # led by all three nodes
    await mesh.cache.mset([(k, k) for k in keys])
    assert len({mesh.route("cache", k).address for k in keys}) == 3
    # Without the client's route header the node forwards the others' shares.
    stub = pb_grpc.CacheServiceStub(channel_at(shared_cluster.nodes[0].address))
    answer = await stub.MGet(pb.MGetRequest(keys=keys, consistency=LINEARIZABLE), timeout=10)
    assert answer.consistency == LINEARIZABLE and not answer.truncated
    assert [r.value for r in answer.results] == [k.encode() for k in keys]
    plain = await stub.MGet(pb.MGetRequest(keys=keys[:3]), timeout=10)
    assert plain.consistency == pb.READ_CONSISTENCY_UNSPECIFIED
    assert [r.value for r in plain.results] == [k.encode() for k in keys[:3]]

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.MGet(pb.MGetRequest(keys=keys, consistency=7), timeout=5)  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "consistency" in (info.value.details() or "")
