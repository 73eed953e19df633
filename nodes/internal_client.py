"""Calls a node makes on its own to another service, for a tenant.

A saga's primary enqueues its steps' jobs and reads their outcome from the
scheduler, and appends its history to the event store, long after the call
that started the saga: there is no caller's token to pass on. It calls the
node that leads the key (itself included) on its peer port, as a member (its
peer credential) acting for the saga's tenant (`TENANT_HEADER`), which only
the peer port accepts. A node whose map is older than ours forwards the call
like any other.
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf import message

from common.errors import MeshStatusError, Reason
from common.slots import slot_for
from nodes.planes import TENANT_HEADER
from nodes.replication.manager import Replication, unavailable

__all__ = ["InternalClient", "transient"]

R = TypeVar("R", bound=message.Message)

DEFAULT_TIMEOUT = 5.0


class InternalClient:
    """Unary calls to whichever node leads a key, as a member acting for a tenant."""

    def __init__(self, replication: Replication) -> None:
        self._replication = replication

    def peer_address(self, key: str) -> str:
        """The peer port of the node leading ``key``'s slot now."""
        table = self._replication.table
        if table is None:
            raise unavailable(Reason.NO_MAP, "this node has no cluster map yet")
        view = table.group_of_slot(slot_for(key))
        address = table.peer_addresses.get(view.primary, "") if view and view.primary else ""
        if not address:
            raise unavailable(Reason.GROUP_UNAVAILABLE,
                              f"{key!r} has no primary right now (failover in progress)")
        return address

    def peer_addresses(self) -> list[str]:
        """The peer port of every node leading a group now."""
        table = self._replication.table
        if table is None:
            raise unavailable(Reason.NO_MAP, "this node has no cluster map yet")
        primaries = {view.primary for view in table.groups.values() if view.primary}
        return sorted({table.peer_addresses[n] for n in primaries if n in table.peer_addresses})

    async def call(self, key: str, path: str, request: message.Message,
                   response_type: type[R], tenant: str, *,
                   timeout: float = DEFAULT_TIMEOUT, address: str = "",
                   extra: tuple[tuple[str, str], ...] = ()) -> R:
        """``path`` (e.g. "/mesh.scheduler.v1.SchedulerService/Enqueue") at the
        node leading ``key`` (or at ``address``); raises grpc.aio.AioRpcError as
        that node answered, or MeshStatusError when no node leads the key."""
        metadata = [*self._replication.signer.metadata(), *extra]
        if tenant:
            metadata.append((TENANT_HEADER, tenant))
        call = self._replication.channel(address or self.peer_address(key)).unary_unary(
            path, request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString)
        response: R = await call(request, timeout=timeout, metadata=tuple(metadata))
        return response


def transient(error: grpc.aio.AioRpcError | MeshStatusError) -> bool:
    """Whether the call may simply be made again later (the owner is moving, or
    unreachable for now)."""
    code = error.code if isinstance(error, MeshStatusError) else error.code()
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
