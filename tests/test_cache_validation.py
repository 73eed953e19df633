"""Bad input gets INVALID_ARGUMENT naming the field, and changes nothing.

These use the raw generated stubs, as a non-Python client would, so nothing
in the typed client can hide a server-side gap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from clients.errors import InvalidArgumentError, ResourceExhaustedError, from_rpc_error
from common.localmesh import LocalMesh
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc


@pytest.fixture
async def stub(shared_node: LocalMesh) -> AsyncIterator[pb_grpc.CacheServiceStub]:
    async with grpc.aio.insecure_channel(shared_node.nodes[0].address) as channel:
        yield pb_grpc.CacheServiceStub(channel)


async def _invalid(call: Any) -> InvalidArgumentError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(info.value)
    assert isinstance(error, InvalidArgumentError)
    return error


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SetRequest(key="", value=b"v"), "key"),
        (pb.SetRequest(key="k" * 1025, value=b"v"), "key"),
        (pb.SetRequest(key="é" * 513, value=b"v"), "key"),  # 1026 bytes in UTF-8
        (pb.SetRequest(key="k", value=b"x" * ((1 << 20) + 1)), "value"),
        (pb.SetRequest(key="k", value=b"v", ttl=duration_pb2.Duration(seconds=-1)), "ttl"),
        (pb.SetRequest(key="k", value=b"v", ttl=duration_pb2.Duration(nanos=-5)), "ttl"),
        (pb.SetRequest(key="k", value=b"v", only_if_absent=True, only_if_version=3),
         "only_if_version"),
    ],
)
async def test_set_rejects_bad_input(
    stub: pb_grpc.CacheServiceStub, request_: pb.SetRequest, field: str
) -> None:
    error = await _invalid(stub.Set(request_))
    assert field in error.field_violations
    assert field in error.message


async def test_bad_input_writes_nothing(stub: pb_grpc.CacheServiceStub) -> None:
    await _invalid(stub.Set(pb.SetRequest(
        key="val:untouched", value=b"v", ttl=duration_pb2.Duration(seconds=-3))))
    assert not (await stub.Get(pb.GetRequest(key="val:untouched"))).found
    await _invalid(stub.MSet(pb.MSetRequest(entries=[
        pb.MSetEntry(key="val:m1", value=b"ok"), pb.MSetEntry(key="", value=b"bad")])))
    assert not (await stub.Get(pb.GetRequest(key="val:m1"))).found


async def test_get_delete_incr_reject_bad_keys(stub: pb_grpc.CacheServiceStub) -> None:
    assert "key" in (await _invalid(stub.Get(pb.GetRequest(key="")))).field_violations
    assert "key" in (await _invalid(stub.Delete(pb.DeleteRequest(key="")))).field_violations
    assert "key" in (await _invalid(
        stub.Incr(pb.IncrRequest(key="x" * 2000)))).field_violations
    error = await _invalid(stub.Incr(pb.IncrRequest(
        key="n", delta=1, ttl=duration_pb2.Duration(seconds=-1))))
    assert "ttl" in error.field_violations


async def test_batches_name_the_bad_item(stub: pb_grpc.CacheServiceStub) -> None:
    error = await _invalid(stub.MGet(pb.MGetRequest(keys=["a", "b", ""])))
    assert "keys[2]" in error.field_violations
    error = await _invalid(stub.MGet(pb.MGetRequest(keys=[])))
    assert "keys" in error.field_violations
    error = await _invalid(stub.MGet(pb.MGetRequest(keys=["k"] * 1001)))
    assert "keys" in error.field_violations
    error = await _invalid(stub.MSet(pb.MSetRequest(entries=[
        pb.MSetEntry(key="a", value=b"1"),
        pb.MSetEntry(key="b", value=b"x" * ((1 << 20) + 1))])))
    assert "entries[1].value" in error.field_violations
    error = await _invalid(stub.MSet(pb.MSetRequest(entries=[
        pb.MSetEntry(key="a", value=b"1", ttl=duration_pb2.Duration(seconds=-1))])))
    assert "entries[0].ttl" in error.field_violations


async def test_wrong_type_for_incr(stub: pb_grpc.CacheServiceStub) -> None:
    await stub.Set(pb.SetRequest(key="val:json", value=b'{"a": 1}'))
    error = await _invalid(stub.Incr(pb.IncrRequest(key="val:json", delta=1)))
    assert error.reason == "NOT_AN_INTEGER"
    assert "key" in error.field_violations


async def test_watch_rejects_bad_selection(stub: pb_grpc.CacheServiceStub) -> None:
    for request, field in [
        (pb.WatchRequest(), "keys"),
        (pb.WatchRequest(prefixes=[""]), "prefixes[0]"),
        (pb.WatchRequest(keys=["ok", ""]), "keys[1]"),
    ]:
        call = stub.Watch(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = from_rpc_error(info.value)
        assert isinstance(error, InvalidArgumentError)
        assert field in error.field_violations


async def test_unparseable_request_is_rejected(shared_node: LocalMesh) -> None:
    """Bytes that are not a SetRequest at all (a wire-type error)."""
    async with grpc.aio.insecure_channel(shared_node.nodes[0].address) as channel:
        raw = channel.unary_unary("/mesh.cache.v1.CacheService/Set")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")
    assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)


async def test_overload_is_resource_exhausted(
    local_mesh: Any,
) -> None:
    """With max 2 concurrent calls, a third one while two watches hold their slots
    is refused with RESOURCE_EXHAUSTED instead of queueing without bound."""
    local = local_mesh(1, extra=["--max-concurrent-rpcs", "2"])
    async with grpc.aio.insecure_channel(local.nodes[0].address) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        watches = [stub.Watch(pb.WatchRequest(keys=[f"k{i}"])) for i in range(2)]
        for w in watches:
            assert (await w.read()).created
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Get(pb.GetRequest(key="k"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(from_rpc_error(info.value), ResourceExhaustedError)
        for w in watches:
            w.cancel()
