"""``mesh.cache.watch(...)``: a merged stream of cache changes from the nodes that apply them.

Keys are watched on their slot's primary (with the map, the node refuses a key
it does not own, and the watch is set up again by the newer map); prefixes can
match keys of any group, so they are watched on every live node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from clients.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NoNodesError,
    UnavailableError,
    WatchGapError,
    from_rpc_error,
)
from clients.retry import with_retries
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.mesh import Mesh

# address -> (node id, keys, prefixes) of one Watch stream.
Plan = dict[str, tuple[str, list[str], list[str]]]


class EventType(Enum):
    SET = pb.EVENT_TYPE_SET
    DELETE = pb.EVENT_TYPE_DELETE
    EXPIRE = pb.EVENT_TYPE_EXPIRE
    EVICT = pb.EVENT_TYPE_EVICT


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """One change seen by ``watch``."""

    type: EventType
    key: str
    value: bytes
    revision: int
    node: str


class CacheWatch:
    """A merged stream of changes from every node that holds watched keys."""

    def __init__(
        self, mesh: Mesh, keys: list[str], prefixes: list[str], timeout: float | None = None
    ) -> None:
        self._mesh = mesh
        self._keys = keys
        self._prefixes = prefixes
        self._timeout = timeout
        self._queue: asyncio.Queue[CacheEvent | BaseException] = asyncio.Queue()
        self._calls: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> CacheWatch:
        if not self._keys and not self._prefixes:
            raise InvalidArgumentError("keys: give at least one key or prefix",
                                       field_violations={"keys": "give at least one key or prefix"})
        # Setting up has no effect on the data, so any failure (a refusal, a
        # node down, no map yet) is retried as a whole until the deadline.
        await with_retries(self._mesh, self._open, timeout=self._timeout, safe=True,
                           follow_hints=False)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        calls, tasks = self._calls, self._tasks
        self._calls, self._tasks = [], []
        for call in calls:
            call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _plan(self) -> Plan:
        mesh = self._mesh
        plan: Plan = {}
        unowned: list[str] = []
        for key in self._keys:
            target = mesh.route("cache", key)
            if target.owner:
                plan.setdefault(target.address, (target.node_id, [], []))[1].append(key)
            else:
                unowned.append(key)
        if unowned:  # no owner known: one node takes them all (it forwards, or says why not)
            target = mesh.any_node("cache")
            plan.setdefault(target.address, (target.node_id, [], []))[1].extend(unowned)
        if self._prefixes:  # a prefix can match keys of any group
            nodes = mesh.nodes("cache")
            if not nodes:
                raise NoNodesError("no live node offers the cache service")
            for node in nodes:
                plan.setdefault(node.address, (node.node_id, [], []))[2].extend(self._prefixes)
        return plan

    async def _open(self, budget: float, _address: str | None) -> None:
        """Start one stream per planned node; return once every node confirmed it."""
        await self.close()  # what a failed try left behind
        self._queue = asyncio.Queue()
        started: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for address, (node_id, keys, prefixes) in self._plan().items():
            stub = self._mesh.stub(pb_grpc.CacheServiceStub, address)
            call = stub.Watch(pb.WatchRequest(keys=keys, prefixes=prefixes),
                              metadata=self._mesh.call_metadata())
            self._calls.append(call)
            ready: asyncio.Future[None] = loop.create_future()
            started.append(ready)
            self._tasks.append(asyncio.create_task(self._pump(node_id, address, call, ready)))
        try:
            await asyncio.wait_for(asyncio.gather(*started), max(budget, 0.0))
        except TimeoutError:
            await self.close()
            raise DeadlineExceededError("the watch was not confirmed before the deadline",
                                        code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except BaseException:
            await self.close()
            raise

    def __aiter__(self) -> AsyncIterator[CacheEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[CacheEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _pump(self, node: str, address: str, call: Any, ready: asyncio.Future[None]) -> None:
        last = 0
        try:
            async for message in call:
                if message.created:
                    if not ready.done():
                        ready.set_result(None)
                    continue
                if message.seq != last + 1:
                    missed = message.seq - last - 1
                    self._queue.put_nowait(WatchGapError(
                        f"watch on {node} missed {missed} changes", missed=missed))
                    return
                last = message.seq
                e = message.event
                self._queue.put_nowait(
                    CacheEvent(EventType(e.type), e.key, e.value, e.revision, node))
            ended = UnavailableError(f"watch stream from {node} ended")
            ended.address = address
            error: BaseException = ended
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            error = from_rpc_error(exc, address)
        except asyncio.CancelledError:
            raise
        if not ready.done():
            ready.set_exception(error)
        else:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(error)
