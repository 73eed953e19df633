"""Batches whose values are more than one message (32 MiB) may hold, on three
real nodes. An MGet: the node answers the results that fit, in key order, and
says the answer is truncated; the typed client asks again for the rest. An
MSet: the typed client sends a node's share in parts of whole groups, and
coalesced sets in batches that fit. (Before, such calls were refused as larger
than the message limit.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from clients import InvalidArgumentError, Mesh
from common.localmesh import LocalMesh
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc
from tests.test_cache_pipeline import _calls

Connect = Callable[..., Awaitable[Mesh]]
MIB = 1 << 20


def _keys(mesh: Mesh, prefix: str, count: int, *, at: str, here: bool = True) -> list[str]:
    """``count`` keys led by the node at ``at`` (``here``) or by the others."""
    keys: list[str] = []
    i = 0
    while len(keys) < count:
        key = f"{prefix}:{i}"
        if (mesh.route("cache", key).address == at) == here:
            keys.append(key)
        i += 1
    return keys


def _over_a_message(mesh: Mesh, local: LocalMesh, prefix: str, node: int
                    ) -> tuple[str, list[str], list[bytes]]:
    """A node's address, and 36 keys it leads with a distinct value of 1 MiB each:
    36 MiB, more than the 32 MiB one message may hold."""
    owner = local.nodes[node].address
    keys = _keys(mesh, prefix, 36, at=owner)
    return owner, keys, [bytes([i]) * MIB for i in range(len(keys))]


@pytest.fixture
def stub_at(channel_at: Callable[[str], grpc.aio.Channel]
            ) -> Callable[[str], pb_grpc.CacheServiceStub]:
    return lambda address: pb_grpc.CacheServiceStub(channel_at(address))


async def test_an_mget_of_more_than_a_message_returns_every_value_in_order(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    owner, keys, values = _over_a_message(mesh, shared_cluster, "parts", 0)
    for key, value in zip(keys, values, strict=True):
        await mesh.cache.set(key, value)
    missing = _keys(mesh, "parts-missing", 1, at=owner)
    asked = [*keys, *missing, keys[0]]
    expected = [*values, None, values[0]]

    before = await asyncio.to_thread(_calls, shared_cluster, "MGet")
    assert await mesh.cache.mget(asked) == expected
    after = await asyncio.to_thread(_calls, shared_cluster, "MGet")
    assert after - before >= 2  # answered in parts

    # Concurrent gets coalesce into one MGet; it too comes back in parts, and
    # no get has to go alone.
    gets = await asyncio.to_thread(_calls, shared_cluster, "Get")
    assert await asyncio.gather(*(mesh.cache.get(k) for k in asked)) == expected
    assert await asyncio.to_thread(_calls, shared_cluster, "Get") == gets


async def test_a_node_answers_what_fits_in_key_order_and_says_it_is_truncated(
    shared_cluster: LocalMesh, mesh_client: Connect, stub_at: Any
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    node = shared_cluster.nodes[0].address
    here = _keys(mesh, "fits-here", 2, at=node)
    elsewhere = _keys(mesh, "fits-away", 3, at=node, here=False)
    value = b"v" * 100_000
    await mesh.cache.mset([(k, value) for k in here + elsewhere])
    stub = stub_at(node)

    # Led here and forwarded shares alike: a prefix of the keys, in their order.
    keys = [here[0], elsewhere[0], here[1], elsewhere[1]]
    answer = await stub.MGet(pb.MGetRequest(keys=keys, max_answer_bytes=250_000))
    assert [r.value for r in answer.results] == [value, value] and answer.truncated
    rest = await stub.MGet(pb.MGetRequest(keys=keys[2:], max_answer_bytes=250_000))
    assert [r.value for r in rest.results] == [value, value] and not rest.truncated

    # A share forwarded whole to its owner comes back truncated as well.
    answer = await stub.MGet(pb.MGetRequest(keys=elsewhere, max_answer_bytes=250_000))
    assert len(answer.results) == 2 and answer.truncated

    # However small the limit, at least one result: the caller always gets on.
    answer = await stub.MGet(pb.MGetRequest(keys=keys, max_answer_bytes=1))
    assert [r.value for r in answer.results] == [value] and answer.truncated

    # Within the limit (or none given: the node's own), the whole answer.
    for limit in (0, 1_000_000):
        answer = await stub.MGet(pb.MGetRequest(keys=[*keys, "fits:missing"],
                                                max_answer_bytes=limit))
        assert [r.found for r in answer.results] == [True] * 4 + [False]
        assert not answer.truncated


async def test_an_mset_of_more_than_a_message_goes_in_parts_of_whole_groups(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    _, keys, values = _over_a_message(mesh, shared_cluster, "mset-parts", 1)
    before = await asyncio.to_thread(_calls, shared_cluster, "MSet")
    versions = await mesh.cache.mset(list(zip(keys, values, strict=True)))
    assert len(versions) == len(keys) and all(v > 0 for v in versions)
    assert await asyncio.to_thread(_calls, shared_cluster, "MSet") - before >= 2
    assert await mesh.cache.mget(keys) == values

    # Coalesced sets: batches that fit, none refused and sent again alone.
    sets = await asyncio.to_thread(_calls, shared_cluster, "Set")
    before = await asyncio.to_thread(_calls, shared_cluster, "MSet")
    again = [bytes([255 - i]) * MIB for i in range(len(keys))]
    versions = await asyncio.gather(*(mesh.cache.set(k, v)
                                      for k, v in zip(keys, again, strict=True)))
    assert all(v > 0 for v in versions)
    assert await asyncio.to_thread(_calls, shared_cluster, "Set") == sets
    assert await asyncio.to_thread(_calls, shared_cluster, "MSet") - before >= 2
    assert await mesh.cache.mget(keys) == again


async def test_an_mset_of_one_group_over_a_message_is_refused_naming_items(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    # One hash tag: one slot, so one group (which MSet writes atomically).
    items = [(f"{{one-group}}:{i}", b"x" * MIB) for i in range(34)]
    with pytest.raises(InvalidArgumentError) as refused:
        await mesh.cache.mset(items)
    assert "items" in refused.value.field_violations
    assert await mesh.cache.get(items[0][0]) is None  # nothing written
