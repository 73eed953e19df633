"""A node's two ports, and what guards each.

- The **client port** serves the public services, health and reflection of
  those. Callers there are clients: a header meant for members of the cluster
  (the forwarding hop count, a peer credential) is refused with
  INVALID_ARGUMENT, so no client can raise its own hop budget or pose as a
  forwarding node.
- The **peer port** serves replication and calls forwarded by other nodes, to
  members of the cluster only: every call must carry a valid peer credential
  (`common.peer`), checked before any handler runs. Without a cluster secret
  the peer port is open (local development; the node warns at start).

Both guards are server interceptors: they look at the call's metadata once and
either hand the call on untouched or answer it themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from common.errors import MeshStatusError, Reason, invalid_argument
from common.peer import PEER_HEADER, Peer, PeerKey, PeerRefused

__all__ = ["HOPS_HEADER", "LOCAL_HEADER", "TENANT_HEADER", "ClientPlaneGuard", "PeerPlaneGuard",
           "calling_peer", "drain"]

log = logging.getLogger(__name__)

HOPS_HEADER = "x-mesh-hops"
"""How many nodes a call was forwarded through (set by nodes, on the peer port)."""
TENANT_HEADER = "x-mesh-tenant"
"""The tenant a member acts for in a call it makes on its own (a saga's primary
enqueueing a step's job): it has no caller's token to pass on. Taken on the
peer port only, so only from members of the cluster."""
LOCAL_HEADER = "x-mesh-local"
"""On a call a node fans out to every primary (ListSagas): answer for the groups
you lead only."""
INTERNAL_HEADERS = frozenset({HOPS_HEADER, PEER_HEADER, TENANT_HEADER, LOCAL_HEADER})

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


DRAIN_SECONDS = 1.0


async def drain(requests: AsyncIterator[Any], seconds: float = DRAIN_SECONDS) -> None:
    """Read a refused stream's requests until the caller half-closes, at most
    ``seconds``. Ending the call while the caller is still sending makes its
    gRPC report its own INTERNAL error instead of our status."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            async for _ in requests:
                pass


def _refusal(handler: grpc.RpcMethodHandler, error: MeshStatusError) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers every call with ``error``."""
    status = error.to_status()

    async def unary(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    async def stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    async def from_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                          ) -> None:
        await drain(requests)
        await context.abort_with_status(status)

    async def stream_from_stream(requests: AsyncIterator[Any],
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await drain(requests)
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_from_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(from_stream)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    return {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}


class ClientPlaneGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses headers that only cluster members may send."""

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        for key, _value in details.invocation_metadata or ():
            if key in INTERNAL_HEADERS:
                return _refusal(handler, invalid_argument(
                    f"metadata {key}", "an internal header, set only between nodes; "
                                       "clients may not send it"))
        return handler


class PeerPlaneGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets through only calls that carry a valid peer credential."""

    LOG_EVERY = 10.0
    """Seconds between two warnings about refused calls (each is counted)."""

    def __init__(self, key: PeerKey | None, refused: Callable[[str], None]) -> None:
        self._key = key
        self._refused = refused
        self._logged_at = 0.0

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or self._key is None:
            return handler
        try:
            self._key.check(_metadata(details))
        except PeerRefused as exc:
            self._refused(exc.reason)
            now = time.monotonic()
            if now - self._logged_at >= self.LOG_EVERY:
                self._logged_at = now
                log.warning("refused a call to %s on the peer port: %s credential",
                            details.method, exc.reason)
            return _refusal(handler, MeshStatusError(
                grpc.StatusCode.UNAUTHENTICATED, str(exc), Reason.PEER_UNAUTHENTICATED))
        return handler


def calling_peer(context: grpc.aio.ServicerContext, key: PeerKey | None) -> Peer | None:
    """The member behind a call the guard let through; None when the plane is open."""
    if key is None:
        return None
    metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return key.check(metadata)  # cached: the guard checked this very credential
