"""What a caller sees when a handler fails unexpectedly or the request is not a
message: a fixed INTERNAL / INVALID_ARGUMENT, never the exception's text
(an in-process server on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from mesh.cache.v1 import cache_pb2, cache_pb2_grpc
from nodes.rpc import add_service
from tests.cluster import error_details

SECRET = "secret-detail-from-inside"


class Broken:
    """A CacheService whose handlers fail the way a bug would."""

    def __getattr__(self, name: str) -> Any:
        async def unary(_request: Any, _context: grpc.aio.ServicerContext) -> Any:
            raise RuntimeError(SECRET)
        return unary

    async def Watch(self, _request: Any, _context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[Any]:
        yield cache_pb2.WatchResponse()
        raise KeyError(SECRET)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    add_service(server, Broken(), cache_pb2.DESCRIPTOR.services_by_name["CacheService"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    await server.stop(0)


async def test_a_failing_handler_is_internal_with_a_fixed_message(
        channel: grpc.aio.Channel) -> None:
    stub = cache_pb2_grpc.CacheServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Get(cache_pb2.GetRequest(key="k"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in (info.value.details() or "")
    assert error_details(info.value)[0] == "INTERNAL"

    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in stub.Watch(cache_pb2.WatchRequest(keys=["k"]), timeout=5):
            pass
    assert streamed.value.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in (streamed.value.details() or "")


async def test_bytes_that_are_no_message_are_invalid_argument(
        channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary("/mesh.cache.v1.CacheService/Get")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"\xff\xff\xff", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(info.value)[2] == {
        "request": "not a valid message of the method's request type"}
