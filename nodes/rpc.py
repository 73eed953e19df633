"""Registering a servicer on the server, with the error handling every service shares.

``add_service`` replaces the generated ``add_XServicer_to_server``: it parses
requests itself so that bytes that are not a valid message are answered with
INVALID_ARGUMENT (gRPC's default is UNKNOWN), and it turns a ``MeshStatusError``
raised anywhere in a handler into the rich status it describes, and a
service's refusal (``ServiceError``) into the status its reason stands for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor, message, message_factory

from common import tenancy
from common.auth import Authenticator
from common.errors import MeshStatusError, Reason, ServiceError, invalid_argument, status_of
from common.metrics import RpcMetrics
from nodes.planes import TENANT_HEADER
from nodes.ratelimit import Limiter
from nodes.session import Calls

log = logging.getLogger(__name__)

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


async def _reject(context: grpc.aio.ServicerContext) -> NoReturn:
    error = invalid_argument("request", "not a valid message of the method's request type")
    await context.abort_with_status(error.to_status())
    raise AssertionError("abort_with_status always raises")


async def _internal(context: grpc.aio.ServicerContext, name: str) -> NoReturn:
    """A bug: the caller gets INTERNAL with a fixed message, the log the traceback
    (never the exception's text on the wire: it may quote anything)."""
    log.exception("%s failed", name)
    await context.abort_with_status(MeshStatusError(
        grpc.StatusCode.INTERNAL, "internal error (logged by the node)",
        Reason.INTERNAL).to_status())
    raise AssertionError("abort_with_status always raises")


def _unary(parse: Callable[[bytes], message.Message],
           method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
           name: str) -> Handler:
    # The hot path of every call: parse inline, one await, no extra coroutine.
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse(raw)
        except message.DecodeError:
            await _reject(context)
        try:
            return await method(request, context)
        except MeshStatusError as exc:
            await context.abort_with_status(exc.to_status())
        except ServiceError as exc:
            await context.abort_with_status(status_of(exc).to_status())
        except ForwardedError as exc:
            await exc.abort(context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _internal(context, name)

    return handler


def _server_stream(parse: Callable[[bytes], message.Message],
                   method: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
                   name: str) -> Handler:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            request = parse(raw)
        except message.DecodeError:
            await _reject(context)
        try:
            async for item in method(request, context):
                yield item
        except MeshStatusError as exc:
            await context.abort_with_status(exc.to_status())
        except ServiceError as exc:
            await context.abort_with_status(status_of(exc).to_status())
        except ForwardedError as exc:
            await exc.abort(context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _internal(context, name)

    return handler


async def _admit(context: grpc.aio.ServicerContext, auth: Authenticator | None,
                 limiter: Limiter | None, method: str, admin: bool = False) -> None:
    """Authenticate the call (its tenant holds for the rest of it), check its role
    when the method is ``admin``-only, then take its rate-limit tokens; raises
    MeshStatusError."""
    if auth is not None:
        metadata = metadata_of(context)
        acting_for = metadata.get(TENANT_HEADER)
        if acting_for is not None:
            # A member of the cluster acting for a tenant on its own (the client
            # port refuses this header, the peer port checked the member).
            if admin:
                raise MeshStatusError(grpc.StatusCode.PERMISSION_DENIED,
                                      f"{method} needs a token with the admin role",
                                      Reason.ADMIN_REQUIRED)
            tenancy.enter(acting_for)
            if limiter is not None:
                await limiter.admit(acting_for, method)
            return
        principal = auth.principal(metadata)
        if admin and not principal.is_admin:
            raise MeshStatusError(grpc.StatusCode.PERMISSION_DENIED,
                                  f"{method} needs a token with the admin role",
                                  Reason.ADMIN_REQUIRED)
        tenancy.enter(principal.tenant)
    if limiter is not None:
        await limiter.admit(tenancy.current(), method)


def _admitted_unary(handler: Handler, auth: Authenticator | None, limiter: Limiter | None,
                    method: str, admin: bool = False) -> Handler:
    async def admitted(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            await _admit(context, auth, limiter, method, admin)
        except MeshStatusError as exc:
            await context.abort_with_status(exc.to_status())
        return await handler(raw, context)

    return admitted


def _admitted_stream(handler: Handler, auth: Authenticator | None, limiter: Limiter | None,
                     method: str, admin: bool = False) -> Handler:
    async def admitted(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            await _admit(context, auth, limiter, method, admin)
        except MeshStatusError as exc:
            await context.abort_with_status(exc.to_status())
        async for item in handler(raw, context):
            yield item

    return admitted


def metadata_of(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata as a dict."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _measured_unary(handler: Handler, name: str, rpc: RpcMetrics) -> Handler:
    async def measured(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "UNKNOWN"  # an exception nobody turned into a status
        try:
            result = await handler(raw, context)
            code = _code(context)
            return result
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code(context, "UNKNOWN")
            raise
        finally:
            rpc.observe(name, code, time.perf_counter() - started)

    return measured


def _measured_stream(handler: Handler, name: str, rpc: RpcMetrics) -> Handler:
    async def measured(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        code = "UNKNOWN"
        try:
            async for item in handler(raw, context):
                yield item
            code = _code(context)
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code(context, "UNKNOWN")
            raise
        finally:
            rpc.observe(name, code, time.perf_counter() - started)

    return measured


def _code(context: grpc.aio.ServicerContext, default: str = "OK") -> str:
    """The status the handler set (abort sets it before raising), else ``default``."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default


def add_service(
    server: grpc.aio.Server, servicer: object, service: descriptor.ServiceDescriptor,
    rpc: RpcMetrics | None = None, auth: Authenticator | None = None,
    limiter: Limiter | None = None, admin_methods: Collection[str] = (),
    calls: Calls | None = None,
) -> None:
    """Serve every unary and server-streaming method of ``service`` from ``servicer``,
    counting each call in ``rpc``, authenticating it with ``auth`` and admitting it
    through ``limiter`` (after authentication: limits are per tenant), if given.
    With ``auth``, the methods named in ``admin_methods`` need the admin role.
    The unary methods' handlers also go into ``calls``, if given: what a session
    (`nodes.session`) calls."""
    unknown = set(admin_methods) - {m.name for m in service.methods}
    if unknown:  # a typo here would silently leave a mutation open to every token
        raise ValueError(f"{service.full_name} has no method {', '.join(sorted(unknown))}")
    handlers = {}
    for method in service.methods:
        admin = method.name in admin_methods
        parse = _parser(method)
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        behaviour = getattr(servicer, method.name)
        name = f"/{service.full_name}/{method.name}"
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name}: client streaming is not wired")
        if method.server_streaming:
            stream = _server_stream(parse, behaviour, name)
            if auth is not None or limiter is not None:
                stream = _admitted_stream(stream, auth, limiter, method.name, admin)
            if rpc is not None:
                stream = _measured_stream(stream, name, rpc)
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=serialize)
        else:
            unary = _unary(parse, behaviour, name)
            if auth is not None or limiter is not None:
                unary = _admitted_unary(unary, auth, limiter, method.name, admin)
            if rpc is not None:
                unary = _measured_unary(unary, name, rpc)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                unary, response_serializer=serialize)
            if calls is not None:
                calls.add(name, unary, serialize)
    # Generic handlers only, not also "registered methods": grpc.aio's server keeps
    # one pending request future per registered method and waits on all of them
    # for every incoming call, so with the ~60 methods of a node's services each
    # call cost an asyncio.wait over ~60 futures (about 7% of a node's CPU on the
    # lock bench). Looking the method up in a few generic handlers is cheaper.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
