"""Registering a servicer on the server, with the error handling every service shares.

``add_service`` replaces the generated ``add_XServicer_to_server``: it parses
requests itself so that bytes that are not a valid message are answered with
INVALID_ARGUMENT (gRPC's default is UNKNOWN), and it turns a ``MeshStatusError``
raised anywhere in a handler into the rich status it describes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor, message, message_factory

from common.errors import MeshStatusError, invalid_argument

Handler = Callable[[Any, grpc.aio.ServicerContext], Any]


class ForwardedError(Exception):
    """Another node's answer to a forwarded call: returned to the caller unchanged
    (code, message and trailing metadata, so rich error details survive)."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error

    async def abort(self, context: grpc.aio.ServicerContext) -> NoReturn:
        error = self.error
        # aio gives a Metadata object; abort() wants a tuple of pairs.
        await context.abort(error.code(), error.details() or "",
                            tuple(error.trailing_metadata() or ()))
        raise AssertionError("abort always raises")


def _parser(method: descriptor.MethodDescriptor) -> Callable[[bytes], message.Message]:
    from_string: Callable[[bytes], message.Message] = message_factory.GetMessageClass(
        method.input_type).FromString
    return from_string


async def _reject(exc: message.DecodeError, context: grpc.aio.ServicerContext) -> NoReturn:
    error = invalid_argument("request", f"not a valid message: {exc}")
    await context.abort_with_status(error.to_status())
    raise AssertionError("abort_with_status always raises")


def _unary(parse: Callable[[bytes], message.Message],
           method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Handler:
    # The hot path of every call: parse inline, one await, no extra coroutine.
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse(raw)
        except message.DecodeError as exc:
            await _reject(exc, context)
        try:
            return await method(request, context)
        except MeshStatusError as exc:
            await context.abort_with_status(exc.to_status())
        except ForwardedError as exc:
            await exc.abort(context)

    return handler


def _server_stream(parse: Callable[[bytes], message.Message],
                   method: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
                   ) -> Handler:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            request = parse(raw)
        except message.DecodeError as exc:
            await _reject(exc, context)
        try:
            async for item in method(request, context):
                yield item
        except MeshStatusError as exc:
            await context.abort_with_status(exc.to_status())
        except ForwardedError as exc:
            await exc.abort(context)

    return handler


def add_service(
    server: grpc.aio.Server, servicer: object, service: descriptor.ServiceDescriptor
) -> None:
    """Serve every unary and server-streaming method of ``service`` from ``servicer``."""
    handlers = {}
    for method in service.methods:
        parse = _parser(method)
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name}: client streaming is not wired")
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(parse, behaviour), response_serializer=serialize)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(parse, behaviour), response_serializer=serialize)
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, handlers)


def add_unimplemented(
    server: grpc.aio.Server, service: descriptor.ServiceDescriptor, why: str
) -> None:
    """Serve ``service`` so that it is listed (health, reflection) but every call
    answers UNIMPLEMENTED with ``why``: the contract exists, the code does not yet."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, why)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, why)
        yield None  # never reached; the yield makes this an async generator

    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            make = (grpc.stream_stream_rpc_method_handler if method.server_streaming
                    else grpc.stream_unary_rpc_method_handler)
        else:
            make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(streaming if method.server_streaming else unary)
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
