"""Any node is an entry point: a request for a slot led elsewhere is redirected or forwarded.

Callers that route by themselves (the Python client) send ``x-mesh-route:
client`` and get ``FAILED_PRECONDITION`` / ``WRONG_OWNER`` naming the owner and
the map epoch, so they fix their map and go straight there next time. Everyone
else (grpcurl, the Node example, any plain gRPC stub) is forwarded to the owner,
with the caller's deadline, and gets the owner's answer, errors included.

A forwarded call goes to the owner's peer port with this node's peer credential
and the caller's own bearer token: the owner checks that the call comes from a
member, then authenticates the caller (tenancy is always the owner's decision).
``x-mesh-hops`` bounds forwarding when maps disagree for a moment; only nodes
set it (the client port refuses it).

An owner's peer address that answers as no member would (its port now taken by
another process, or by another node's client port after a restart) is the
owner being unreachable, not the caller's error: the caller gets UNAVAILABLE,
which it retries once the map names where the slot went.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import message

from common.errors import MeshStatusError, Reason
from common.peer import PeerSigner
from nodes.planes import HOPS_HEADER, TENANT_HEADER
from nodes.replication.group import Group
from nodes.replication.manager import Redirect, Replication
from nodes.rpc import ForwardedError, metadata_of

__all__ = ["HOPS_HEADER", "ROUTE_HEADER", "Forwarder", "wrong_owner"]

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-mesh-route"
AUTH_HEADER = "authorization"
MAX_HOPS = 2
_FALLBACK_TIMEOUT = 5.0


class Forwarder:
    """Decides, per request, between serving here, redirecting and forwarding."""

    def __init__(self, replication: Replication, signer: PeerSigner) -> None:
        self.replication = replication
        self._signer = signer

    def resolve(self, slot: int, context: grpc.aio.ServicerContext) -> Group | Redirect:
        """The local group for ``slot``, or a Redirect to forward along.

        Raises WRONG_OWNER instead of returning a Redirect when the caller routes
        by itself, and TOO_MANY_HOPS when forwarding would loop.
        """
        target = self.replication.resolve(slot)
        if isinstance(target, Group):
            return target
        metadata = metadata_of(context)
        if metadata.get(ROUTE_HEADER) == "client":
            raise wrong_owner(target)
        if _hops(metadata) >= MAX_HOPS or not target.owner_peer_address:
            raise MeshStatusError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot forward slot {slot}: maps disagree or the owner is unknown; retry",
                Reason.TOO_MANY_HOPS, {"slot": str(slot)})
        return target

    def _call_args(self, context: grpc.aio.ServicerContext,
                   fallback: float | None = _FALLBACK_TIMEOUT) -> dict[str, Any]:
        metadata = metadata_of(context)
        remaining = context.time_remaining()
        forwarded = [(HOPS_HEADER, str(_hops(metadata) + 1)), *self._signer.metadata()]
        if AUTH_HEADER in metadata:  # the owner authenticates the caller itself
            forwarded.append((AUTH_HEADER, metadata[AUTH_HEADER]))
        if TENANT_HEADER in metadata:  # a member acting for a tenant (peer port only)
            forwarded.append((TENANT_HEADER, metadata[TENANT_HEADER]))
        return {"timeout": remaining if remaining is not None else fallback,
                "metadata": tuple(forwarded)}

    async def unary(self, target: Redirect, path: str, request: message.Message,
                    response_type: type[message.Message],
                    context: grpc.aio.ServicerContext) -> Any:
        """Send ``request`` to the owner and return its response."""
        call = self.replication.channel(target.owner_peer_address).unary_unary(
            path, request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString)
        try:
            return await call(request, **self._call_args(context))
        except grpc.aio.AioRpcError as exc:
            raise _forwarded(exc, target) from None

    async def stream(self, target: Redirect, path: str, request: message.Message,
                     response_type: type[message.Message],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Relay a server stream from the owner."""
        call = self.replication.channel(target.owner_peer_address).unary_stream(
            path, request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString)
        try:
            # A stream is long-lived by nature (a subscription): without a
            # deadline of the caller's, it has none here either.
            async for item in call(request, **self._call_args(context, fallback=None)):
                yield item
        except grpc.aio.AioRpcError as exc:
            raise _forwarded(exc, target) from None


def _forwarded(error: grpc.aio.AioRpcError, target: Redirect) -> Exception:
    """The owner's answer for the caller, unless what answered is no member's peer
    port: then UNAVAILABLE (see the module's docstring)."""
    code = error.code()
    stranger = code == grpc.StatusCode.UNIMPLEMENTED or (
        code == grpc.StatusCode.INVALID_ARGUMENT  # a client port refusing our headers
        and (error.details() or "").startswith("metadata x-mesh-"))
    if not stranger:
        return ForwardedError(error)
    log.warning("%s at %s answered a forwarded call as no member would (%s): "
                "the map is out of date or the port was taken", target.owner_node_id,
                target.owner_peer_address, code.name)
    return MeshStatusError(
        grpc.StatusCode.UNAVAILABLE,
        f"the owner of slot {target.slot} ({target.owner_node_id}) is not reachable at "
        f"its peer address; retry", Reason.GROUP_UNAVAILABLE,
        {"slot": str(target.slot), "owner_node_id": target.owner_node_id})


def _hops(metadata: dict[str, str]) -> int:
    """The hop count another node set (the client port refuses the header)."""
    hops = metadata.get(HOPS_HEADER, "0")
    return int(hops) if hops.isdigit() else MAX_HOPS


def wrong_owner(target: Redirect) -> MeshStatusError:
    return MeshStatusError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"slot {target.slot} is served by {target.owner_node_id or 'no node'} "
        f"({target.owner_address or 'unknown address'}) at map epoch {target.epoch}",
        Reason.WRONG_OWNER,
        {"slot": str(target.slot), "group_id": str(target.group_id),
         "epoch": str(target.epoch), "owner_node_id": target.owner_node_id,
         "owner_address": target.owner_address},
    )
