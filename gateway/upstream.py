"""Calls from the gateway to the nodes: the typed client's routing, per caller token.

The gateway keeps one `clients.Mesh` (no token of its own): it follows the
cluster map and membership from etcd, keeps one channel and one circuit
breaker per node, and re-reads the map when a node says it moved on. Each
call is sent with the HTTP caller's own ``authorization`` header, so the node
authenticates the caller and scopes it to its tenant, as for a gRPC client.

A call whose route binds a key (``/v1/cache/{key}``) goes to the key's primary
with ``x-mesh-route: client``: a node that no longer leads the slot answers
WRONG_OWNER instead of forwarding, and the retry loop of the typed client
(`clients.retry.with_retries`) hops to the owner it names: one hop at most
once the map is current. Calls that name no single key (MGet, MSet, Claim,
Stats...) go to any node without that header; the node splits and forwards
them, as for grpcurl. GET calls are safe to repeat after an unknown outcome;
the others are retried only when the node certainly did nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory

from clients.breaker import CIRCUIT_OPEN, CircuitBreaker
from clients.errors import DeadlineExceededError, MeshError, UnavailableError, from_rpc_error
from clients.mesh import ROUTE_HEADER, Mesh
from clients.retry import with_retries
from clients.router import Target
from gateway.rules import Route

__all__ = ["Call", "Stream", "Upstream"]

Metadata = tuple[tuple[str, str], ...]


WAIT_FIELDS = ("wait", "wait_timeout")
"""Request fields (Durations) by which a call asks the node to wait before answering."""


def _silent(error: MeshError) -> bool:
    """The node gave no answer of its own (as `clients.mesh` judges it for its breaker)."""
    return isinstance(error, DeadlineExceededError) or (
        isinstance(error, UnavailableError) and not error.reason)


@dataclass(frozen=True)
class Call:
    """One transcoded call: where it routes and what it carries."""

    route: Route
    request: message.Message
    authorization: str
    """The caller's ``authorization`` header, passed through as it is ('' if none)."""

    def routing(self) -> tuple[str, str | int] | None:
        """("key", value) or ("slot", n) when the call belongs to one slot, else None."""
        variables = self.route.variables
        if not variables:
            return None
        return self._bound(variables)

    def wait(self) -> float:
        """Seconds the request itself asks the node to wait (a Claim's long poll, an
        Acquire's wait_timeout): added to the call's deadline, which would otherwise
        cut the wait short."""
        fields = self.request.DESCRIPTOR.fields_by_name
        for name in WAIT_FIELDS:
            f = fields.get(name)
            if f is not None and f.message_type is not None \
                    and f.message_type.full_name == "google.protobuf.Duration":
                value = getattr(self.request, name)
                return max(0.0, float(value.seconds + value.nanos / 1e9))
        return 0.0

    def entry(self) -> str | None:
        """For a stream that names keys in its first field (a Watch of keys, a
        Subscribe to channels), the first key: the node leading it serves the
        stream, or forwards it whole. A notification subscription of an inbox
        alone: the inbox's user."""
        fields = self.route.method.input_type.fields
        if not self.route.streaming or not fields:
            return None
        first = fields[0]
        if not first.is_repeated:
            return None
        values = getattr(self.request, first.name)
        if first.type == descriptor.FieldDescriptor.TYPE_STRING:
            return str(values[0]) if values else None
        if first.message_type is not None and "channel" in first.message_type.fields_by_name:
            if values:
                return str(values[0].channel)
            inbox = getattr(self.request, "inbox", "")
            return str(inbox) if inbox else None
        return None

    def _bound(self, variables: list[str]) -> tuple[str, str | int]:
        field = self.route.method.input_type.fields_by_name[variables[0]]
        value = getattr(self.request, field.name)
        if field.type == descriptor.FieldDescriptor.TYPE_STRING:
            return ("key", value)
        return ("slot", int(value))


def _nothing() -> None:
    pass


@dataclass
class Stream:
    """An open server stream and its first message (already read)."""

    call: grpc.aio.UnaryStreamCall
    first: message.Message
    address: str
    release: Callable[[], None] = _nothing
    """Call once the stream is over: lets its channel go (see `clients.Mesh.hold`)."""


class Upstream:
    """Sends transcoded calls through the mesh's routing; see the module doc."""

    def __init__(self, mesh: Mesh, timeout: float) -> None:
        self.mesh = mesh
        self.timeout = timeout

    @property
    def ready(self) -> bool:
        """The cluster map is loaded (calls can go straight to owners)."""
        return self.mesh.table is not None

    def _target(self, call: Call, address: str | None) -> tuple[Target, bool]:
        """Where to send ``call`` and whether it is routed by us (WRONG_OWNER wanted)."""
        routing = call.routing()
        if address is not None:
            return Target(address, address), routing is not None
        service = call.route.service
        if routing is None:
            entry = call.entry()
            if entry is not None:
                return self.mesh.route(service, entry), False
            return self.mesh.any_node(service), False
        kind, value = routing
        if kind == "key":
            assert isinstance(value, str)
            return self.mesh.route(service, value), True
        assert isinstance(value, int)
        return self.mesh.route_slot(service, value % (1 << 14)), True

    def _metadata(self, call: Call, routed: bool) -> Metadata:
        pairs: list[tuple[str, str]] = []
        if routed and self.mesh.table is not None:
            pairs.append((ROUTE_HEADER, "client"))
        if call.authorization:
            pairs.append(("authorization", call.authorization))
        return tuple(pairs)

    def _method(self, call: Call, address: str, streaming: bool) -> Any:
        output = message_factory.GetMessageClass(call.route.method.output_type)
        channel = self.mesh.channel(address)
        factory = channel.unary_stream if streaming else channel.unary_unary
        return factory(call.route.path, request_serializer=_serialize,
                       response_deserializer=output.FromString)

    def _refused(self, address: str) -> UnavailableError | None:
        if self.mesh.breaker(address).allow():
            return None
        refused = UnavailableError(
            f"{address} stopped answering; calls to it are held back for a moment",
            code=grpc.StatusCode.UNAVAILABLE, reason=CIRCUIT_OPEN)
        refused.address = address
        return refused

    async def unary(self, call: Call) -> message.Message:
        """The answer to ``call``; raises the MeshError of the last try."""

        async def attempt(budget: float, address: str | None) -> message.Message:
            target, routed = self._target(call, address)
            refused = self._refused(target.address)
            if refused is not None:
                raise refused
            breaker = self.mesh.breaker(target.address)
            try:
                response: message.Message = await self._method(call, target.address, False)(
                    call.request, timeout=max(budget, 0.001),
                    metadata=self._metadata(call, routed))
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, target.address)
                _judge(breaker, error)
                raise error from None
            except BaseException:
                breaker.abandon()
                raise
            breaker.success()
            return response

        return await with_retries(self.mesh, attempt, timeout=self.timeout + call.wait(),
                                  safe=call.route.http_method == "GET")

    async def stream(self, call: Call) -> Stream:
        """Open ``call``'s server stream and read its first message (redirects and
        retries as for a unary call: nothing has been delivered yet)."""

        async def attempt(budget: float, address: str | None) -> Stream:
            target, routed = self._target(call, address)
            refused = self._refused(target.address)
            if refused is not None:
                raise refused
            breaker = self.mesh.breaker(target.address)
            stream: grpc.aio.UnaryStreamCall = self._method(call, target.address, True)(
                call.request, metadata=self._metadata(call, routed))
            try:
                first = await asyncio.wait_for(stream.read(), max(budget, 0.001))
            except TimeoutError:
                stream.cancel()
                breaker.failure()
                silent = DeadlineExceededError(
                    f"{target.address} sent nothing within {self.timeout:g} s",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED)
                silent.address = target.address
                raise silent from None
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, target.address)
                _judge(breaker, error)
                raise error from None
            except BaseException:
                stream.cancel()
                breaker.abandon()
                raise
            if first is grpc.aio.EOF:
                ended = UnavailableError(f"{target.address} ended the stream at once",
                                         code=grpc.StatusCode.UNAVAILABLE)
                ended.address = target.address
                raise ended
            breaker.success()
            # Held: a node that leaves the map keeps its channel while we stream from it.
            return Stream(stream, first, target.address, self.mesh.hold(target.address))

        return await with_retries(self.mesh, attempt, timeout=self.timeout, safe=True)


def _judge(breaker: CircuitBreaker, error: MeshError) -> None:
    """An answer, even an error, shows the node is there; silence counts against it."""
    if _silent(error):
        breaker.failure()
    else:
        breaker.success()


def _serialize(request: message.Message) -> bytes:
    return request.SerializeToString()
