"""Asking nodes where they are in a group: ReplicationService.GetPosition, on their
peer ports, with the coordinator's peer credential.

One channel per node address, reused; every call has its own deadline, and a
node that does not answer (down, slow, or not serving the call) is simply
unknown: the reconcile step decides with what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

import grpc

from common.peer import PeerSigner
from common.tls import Tls, open_channel
from coordinator.reconcile import NodeGroup
from mesh.replication.v1 import replication_pb2, replication_pb2_grpc

log = logging.getLogger(__name__)

CALL_TIMEOUT = 1.0
_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]

Positions = dict[NodeGroup, replication_pb2.GetPositionResponse]


class PositionProbe:
    """GetPosition on many (node, group) pairs at once, at most ``concurrency`` in flight."""

    def __init__(self, signer: PeerSigner, timeout: float = CALL_TIMEOUT,
                 concurrency: int = 32, tls: Tls | None = None) -> None:
        self._signer = signer
        self._timeout = timeout
        self._tls = tls
        self._limit = asyncio.Semaphore(concurrency)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, replication_pb2_grpc.ReplicationServiceStub] = {}

    def _stub(self, address: str) -> replication_pb2_grpc.ReplicationServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = open_channel(address, self._tls, _OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = replication_pb2_grpc.ReplicationServiceStub(channel)
        return stub

    async def ask(self, address: str, group_id: int,
                  skip: Callable[[], bool] = lambda: False,
                  timed_out: Callable[[], None] = lambda: None,
                  ) -> replication_pb2.GetPositionResponse | bool | None:
        """The node's position; False if it holds nothing of the group; None if unknown
        (or ``skip()`` says so once the call's turn comes). ``timed_out`` is called
        when the node left the call unanswered."""
        async with self._limit:
            if skip():
                return None
            try:
                reply: replication_pb2.GetPositionResponse = await self._stub(address).GetPosition(
                    replication_pb2.GetPositionRequest(group_id=group_id), timeout=self._timeout,
                    metadata=self._signer.metadata())
                return reply
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    timed_out()
                log.debug("GetPosition(%d) on %s: %s", group_id, address, exc.code().name)
                return None

    async def gather(self, pairs: Iterable[NodeGroup], addresses: Mapping[str, str]
                     ) -> tuple[Positions, frozenset[NodeGroup]]:
        """Positions of every pair whose node answered, and the pairs answered NOT_FOUND.

        A node that leaves one call unanswered is not asked the rest of this
        round (they are unknown too): a paused node's timeouts, 32 a second,
        used to hold every round for seconds, and the other nodes' calls queued
        behind them. The calls go to the nodes in turn for the same reason.
        """
        by_node: dict[str, list[NodeGroup]] = {}
        for node_id, group_id in pairs:
            if node_id in addresses:
                by_node.setdefault(node_id, []).append((node_id, group_id))
        wanted = [pair for turn in itertools.zip_longest(*by_node.values()) for pair in turn
                  if pair is not None]
        silent: set[str] = set()

        def ask(node_id: str, group_id: int
                ) -> Awaitable[replication_pb2.GetPositionResponse | bool | None]:
            return self.ask(addresses[node_id], group_id, skip=lambda: node_id in silent,
                            timed_out=lambda: silent.add(node_id))

        replies = await asyncio.gather(*(ask(n, g) for n, g in wanted))
        positions: Positions = {}
        absent: set[NodeGroup] = set()
        for pair, reply in zip(wanted, replies, strict=True):
            if reply is False:
                absent.add(pair)
            elif isinstance(reply, replication_pb2.GetPositionResponse):
                positions[pair] = reply
        return positions, frozenset(absent)

    async def retain(self, addresses: Iterable[str]) -> None:
        """Close the channels of addresses no longer in use."""
        keep = set(addresses)
        for address in [a for a in self._channels if a not in keep]:
            channel = self._channels.pop(address)
            self._stubs.pop(address, None)
            with contextlib.suppress(Exception):
                await channel.close(grace=0)

    async def close(self) -> None:
        await self.retain(())
