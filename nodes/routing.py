"""Routed handlers: a service method says which key its request belongs to, and
this layer, written once for every service, finds the key's owner and either
calls the handler with the local group that leads it, forwards the request to
the owner, or tells a caller that routes by itself where to go (see
`nodes.forwarding`).

    class LockService(Routed, pb_grpc.LockServiceServicer):
        descriptor = pb.DESCRIPTOR.services_by_name["LockService"]

        @routed("name")
        async def Release(self, request, context, group): ...

Validation happens in the handler, on the owner: a forwarded request is checked
where it is served, with the same errors a direct one gets.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeAlias, TypeVar

import grpc
from google.protobuf import descriptor, message, message_factory

from common.errors import invalid_argument
from common.slots import SLOT_COUNT, slot_for
from nodes.forwarding import Forwarder, wrong_owner
from nodes.replication.group import Group
from nodes.replication.manager import Redirect

__all__ = ["Routed", "by_slot", "routed", "routed_stream"]

Ctx: TypeAlias = grpc.aio.ServicerContext
Local: TypeAlias = dict[int, tuple[Group, list[int]]]
"""Indexes of a request's keys by the local group (id) that leads them."""
Remote: TypeAlias = dict[str, tuple[Redirect, list[int]]]
"""Indexes of a request's keys by the owner (its address) to forward them to."""

S = TypeVar("S", bound="Routed")
Req = TypeVar("Req", bound=message.Message)
Resp = TypeVar("Resp", bound=message.Message)


class Routed:
    """A service whose requests belong to slots, served by their groups' primaries."""

    descriptor: ClassVar[descriptor.ServiceDescriptor]
    """The gRPC service (paths and response types of forwarded calls come from it)."""

    forwarder: Forwarder | None = None
    """Set by `start_routing` when the node starts."""

    def start_routing(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def owner(self, key: str, context: Ctx) -> Group | Redirect:
        """The local group leading ``key``'s slot, or where to send it."""
        return self.owner_of_slot(slot_for(key), context)

    def owner_of_slot(self, slot: int, context: Ctx) -> Group | Redirect:
        assert self.forwarder is not None, "start_routing() first"
        return self.forwarder.resolve(slot, context)

    def here(self, slot: int) -> Group:
        """The local group leading ``slot``; WRONG_OWNER if another node leads it
        (for calls that span slots and are never forwarded, such as subscriptions
        to every stream)."""
        assert self.forwarder is not None, "start_routing() first"
        target = self.forwarder.replication.resolve(slot)
        if isinstance(target, Redirect):
            raise wrong_owner(target)
        return target

    def split(self, keys: Sequence[str], context: Ctx) -> tuple[Local, Remote]:
        """Indexes of ``keys`` by local group, and by the remote owner to forward to
        (the batch calls: each share is served or forwarded whole)."""
        local: Local = {}
        remote: Remote = {}
        for i, key in enumerate(keys):
            target = self.owner(key, context)
            if isinstance(target, Redirect):
                remote.setdefault(target.owner_address, (target, []))[1].append(i)
            else:
                local.setdefault(target.group_id, (target, []))[1].append(i)
        return local, remote

    async def forward(self, target: Redirect, method: str, request: message.Message,
                      context: Ctx) -> Any:
        """``request`` answered by its owner (``method`` is this service's RPC name)."""
        assert self.forwarder is not None, "start_routing() first"
        return await self.forwarder.unary(
            target, self._path(method), request, _response_type(self.descriptor, method),
            context)

    def forward_stream(self, target: Redirect, method: str, request: message.Message,
                       context: Ctx) -> AsyncIterator[Any]:
        """The owner's server stream for ``request``, relayed."""
        assert self.forwarder is not None, "start_routing() first"
        return self.forwarder.stream(
            target, self._path(method), request, _response_type(self.descriptor, method),
            context)

    def _path(self, method: str) -> str:
        return f"/{self.descriptor.full_name}/{method}"


Handler: TypeAlias = Callable[[S, Req, Ctx, Group], Awaitable[Resp]]
Method: TypeAlias = Callable[[S, Req, Ctx], Awaitable[Resp]]
StreamHandler: TypeAlias = Callable[..., AsyncIterator[Resp]]
"""``(self, request, context, group, **options)``: a server stream served here."""
StreamMethod: TypeAlias = Callable[..., AsyncIterator[Resp]]
"""``(self, request, context, **options)``."""


def routed(field: str, method: str = ""
           ) -> Callable[[Handler[S, Req, Resp]], Method[S, Req, Resp]]:
    """Serve the decorated RPC where the slot of the request's ``field`` (a key,
    name, stream, queue or job id) is led: the handler gets the local group; a
    request for a slot led elsewhere never reaches it. ``method``: the RPC's
    name, if not the handler's."""
    return _unary(lambda request: slot_for(getattr(request, field)), method)


def by_slot(field: str, method: str = ""
            ) -> Callable[[Handler[S, Req, Resp]], Method[S, Req, Resp]]:
    """Like `routed`, for requests whose ``field`` is a slot (reads of a whole slot)."""
    def slot(request: message.Message) -> int:
        value = int(getattr(request, field))
        if not 0 <= value < SLOT_COUNT:
            raise invalid_argument(field, f"must be below {SLOT_COUNT}")
        return value
    return _unary(slot, method)


def routed_stream(field: str, method: str = ""
                  ) -> Callable[[StreamHandler[Resp]], StreamMethod[Resp]]:
    """`routed` for a server stream: served here, or the owner's stream relayed.
    Keyword ``options`` the caller passes go to the handler when served here."""
    def decorate(handler: StreamHandler[Resp]) -> StreamMethod[Resp]:
        name = method or handler.__name__

        @functools.wraps(handler)
        async def relay(self: Routed, request: message.Message, context: Ctx,
                        **options: Any) -> AsyncIterator[Resp]:
            target = self.owner(getattr(request, field), context)
            messages = self.forward_stream(target, name, request, context) \
                if isinstance(target, Redirect) \
                else handler(self, request, context, target, **options)
            async for item in messages:
                yield item
        return relay
    return decorate


def _unary(slot: Callable[[message.Message], int], method: str
           ) -> Callable[[Handler[S, Req, Resp]], Method[S, Req, Resp]]:
    def decorate(handler: Handler[S, Req, Resp]) -> Method[S, Req, Resp]:
        name = method or handler.__name__

        @functools.wraps(handler)
        async def serve(self: S, request: Req, context: Ctx) -> Resp:
            target = self.owner_of_slot(slot(request), context)
            if isinstance(target, Redirect):
                response: Resp = await self.forward(target, name, request, context)
                return response
            return await handler(self, request, context, target)
        return serve
    return decorate


@functools.cache
def _response_type(service: descriptor.ServiceDescriptor, method: str) -> type[message.Message]:
    return message_factory.GetMessageClass(service.methods_by_name[method].output_type)
