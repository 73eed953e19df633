"""Coalescing: concurrent single-key calls bound for one node, sent as one batch call.

Sixty-four tasks that each ``await mesh.cache.get(key)`` (or ``set``) at once
would cost sixty-four RPCs, and in Python a gRPC call costs far more CPU, on
both ends, than the key it carries. Instead the first call for a node opens a
batch and yields one turn of the event loop, in which every other task that was
ready joins it; then the batch leaves as one call. Nothing waits on a timer, so
a lone call leaves one turn later, alone, as the call it always was.

Under load the batches grow by themselves. A node has at most ``max_in_flight``
of our calls (batches and lone calls alike) open at once; a batch that finds
them all open keeps gathering callers until one of them returns, as the mesh's
own replication link does. Without that limit, replies that come back one at a
time (a replicated write waits for its group's commit) would wake their callers
one at a time, and the batches would shrink to single calls just when the load
is highest. A waiting batch leaves anyway when its shortest deadline is up.

A batch that fails as a whole (its node went away, the map moved, one key was
refused) fails with `BatchFailed`; each caller then goes on alone with its own
retries and its own error, so coalescing never changes what a call returns.
`CoalescedCall` is that whole path for a call whose batch form answers each
item with its result or its own error (EnqueueBatch, CompleteBatch, AppendMany).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import grpc
from google.protobuf.message import Message

from clients.errors import MeshError

Item = TypeVar("Item")
Result = TypeVar("Result")
Answer = TypeVar("Answer")
Refusal = TypeVar("Refusal")

SendOne = Callable[[str, Item, float], Awaitable[Result]]
"""send_one(address, item, budget): the ordinary call, retries and all, for a call
that turned out to be alone."""
SendMany = Callable[[str, list[Item], float], Awaitable[Sequence[Result]]]
"""send_many(address, items, budget): one try of the batch call, a result per item."""

MAX_IN_FLIGHT = 1
"""Calls open to one node before a new batch waits for one of them to return. One:
with more, replies that come back one at a time wake their callers one at a time
and the batches shrink under load (see above); with one, R=1 Set at 64 in flight
went from ~4,600 to ~10,800 calls/s (``bench.replicated``)."""

ITEM_BYTES = 6
"""Bytes an item takes in a batch request besides its own: its field's tag and length."""
BATCH_BYTES = 1024
"""Room a batch request keeps for what is not an item, with much to spare."""


def in_batch(item: Message) -> int:
    """``item``'s bytes in a batch request (for ``size=``)."""
    return item.ByteSize() + ITEM_BYTES


def chunks(indexes: Sequence[int], max_items: int, sizes: Sequence[int] | None = None,
           max_bytes: int = 0) -> list[list[int]]:
    """``indexes`` in order, cut into batches of at most ``max_items`` items and, with
    ``sizes`` (by index), ``max_bytes`` bytes (an item larger than that: alone)."""
    out: list[list[int]] = [[]]
    room = max_bytes
    for i in indexes:
        size = sizes[i] if sizes is not None else 0
        if out[-1] and (len(out[-1]) >= max_items or size > room):
            out.append([])
            room = max_bytes
        out[-1].append(i)
        room -= size
    return out if out[-1] else []


MIN_BUDGET = 0.001
"""The budget a call is sent with when its deadline passed while it waited: it
then fails the way a call out of time does, with the caller's own error."""


class BatchFailed(Exception):
    """The batch this call was part of failed as a whole: make the call alone."""

    def __init__(self, cause: MeshError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class _Batch(Generic[Item, Result]):
    items: list[Item]
    waiters: list[asyncio.Future[Result]]
    """One per item: waiters[i] gets items[i]'s result."""
    deadline: float
    """Loop time: the shortest of its callers' deadlines."""
    keys: set[Hashable] = field(default_factory=set)
    """The items' keys, when equal keys must not share a batch."""
    size: int = 0
    """The items' bytes in the batch call, when batches are bounded in bytes."""
    turn: asyncio.Future[None] | None = None
    """Set while the batch waits for a free call to its node."""


class _Flights:
    """The calls open to one node, and the batches waiting for one of them to end."""

    def __init__(self) -> None:
        self.open = 0
        self.waiting: deque[asyncio.Future[None]] = deque()

    def end(self) -> None:
        """A call ended: the longest-waiting batch may go."""
        self.open -= 1
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():  # a batch that stopped waiting left its turn done
                turn.set_result(None)
                return


class Coalescer(Generic[Item, Result]):
    """Per node, the calls made while its calls are busy, sent together."""

    def __init__(self, send_one: SendOne[Item, Result], send_many: SendMany[Item, Result],
                 max_batch: int, key: Callable[[Item], Hashable] | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT,
                 size: Callable[[Item], int] | None = None, max_bytes: int = 0) -> None:
        """``key``: items with equal keys never share a batch (the second goes alone),
        for calls whose batch form would merge them (MSet keeps a repeated key's
        last value and gives every occurrence its version). ``max_in_flight``:
        calls open to one node before a new batch waits (see the module's text).
        ``size``: an item's bytes in the batch call, which then holds at most
        ``max_bytes`` of them (a message's limit; an item that would pass it
        starts the next batch)."""
        self._send_one = send_one
        self._send_many = send_many
        self._max_batch = max_batch
        self._size = size
        self._max_bytes = max_bytes
        self._key = key
        self._max_in_flight = max_in_flight
        self._pending: dict[str, _Batch[Item, Result]] = {}
        self._flights: dict[str, _Flights] = {}
        self._sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak refs

    async def call(self, address: str, item: Item, budget: float) -> Result:
        """This item's result: from a batch call, or from the ordinary call when it
        turns out to be alone. Raises `BatchFailed` if its batch failed as a whole."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        batch = self._pending.get(address)
        size = 0 if self._size is None else self._size(item)
        if batch is not None and len(batch.items) < self._max_batch and (
                not size or batch.size + size <= self._max_bytes):
            if self._key is not None:
                key = self._key(item)
                if key in batch.keys:
                    return await self._send_alone(address, item, deadline)
                batch.keys.add(key)
            batch.size += size
            return await self._join(batch, item, deadline)
        # The first call of the turn opens the batch, then yields once: every other
        # task that is ready in this turn runs, and those bound for this node join.
        opener: asyncio.Future[Result] = loop.create_future()
        batch = self._pending[address] = _Batch([item], [opener], deadline, size=size)
        if self._key is not None:
            batch.keys.add(self._key(item))
        try:
            await asyncio.sleep(0)
            await self._wait_turn(address, batch)
        finally:
            if batch.turn is not None and not batch.turn.done():
                batch.turn.cancel()  # cancelled while waiting: pass the turn on
            if self._pending.get(address) is batch:
                del self._pending[address]
            if len(batch.items) > 1:
                # In its own task, so that cancelling the opener (even right
                # here) cancels neither the batch nor the others' results.
                task = loop.create_task(self._send(address, batch))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
        if len(batch.items) == 1:  # alone: no batch, no extra task
            return await self._send_alone(address, item, batch.deadline)
        return await opener

    async def _wait_turn(self, address: str, batch: _Batch[Item, Result]) -> None:
        """Return once ``address`` has fewer than ``max_in_flight`` calls open (callers
        keep joining ``batch`` meanwhile), or once the batch's deadline is up."""
        flights = self._flights.get(address)
        loop = asyncio.get_running_loop()
        while flights is not None and flights.open >= self._max_in_flight:
            remaining = batch.deadline - loop.time()
            if remaining <= 0:
                return
            batch.turn = loop.create_future()
            flights.waiting.append(batch.turn)
            try:
                async with asyncio.timeout(remaining):
                    await batch.turn
            except TimeoutError:
                return
            finally:
                if not batch.turn.done():
                    batch.turn.cancel()

    async def _join(self, batch: _Batch[Item, Result], item: Item, deadline: float) -> Result:
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        batch.items.append(item)
        batch.waiters.append(waiter)
        if deadline < batch.deadline:
            batch.deadline = deadline
            if batch.turn is not None and not batch.turn.done():
                batch.turn.set_result(None)  # waiting: measure its wait again
        return await waiter

    def _started(self, address: str) -> _Flights:
        flights = self._flights.get(address)
        if flights is None:
            flights = self._flights[address] = _Flights()
        flights.open += 1
        return flights

    def _ended(self, address: str, flights: _Flights) -> None:
        flights.end()
        if flights.open <= 0 and not flights.waiting:
            self._flights.pop(address, None)

    async def _send_alone(self, address: str, item: Item, deadline: float) -> Result:
        flights = self._started(address)
        try:
            budget = max(deadline - asyncio.get_running_loop().time(), MIN_BUDGET)
            return await self._send_one(address, item, budget)
        finally:
            self._ended(address, flights)

    async def _send(self, address: str, batch: _Batch[Item, Result]) -> None:
        waiters = batch.waiters
        flights = self._started(address)
        budget = max(batch.deadline - asyncio.get_running_loop().time(), MIN_BUDGET)
        try:
            results = await self._send_many(address, batch.items, budget)
        except MeshError as error:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(BatchFailed(error))
            return
        except asyncio.CancelledError:  # the loop is closing
            for waiter in waiters:
                waiter.cancel()
            raise
        except Exception as error:  # a bug: every caller sees it
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            return
        finally:
            self._ended(address, flights)
        for waiter, result in zip(waiters, results, strict=True):
            if not waiter.done():  # a caller that was cancelled meanwhile
                waiter.set_result(result)


ALONE_AGAIN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""A batch item's own error after which it is sent again alone, with retries (as is
WRONG_OWNER: the map moved)."""


class CoalescedCall(Generic[Item, Answer, Refusal]):
    """A call that coalesces, answered exactly as the call alone would answer it.

    Only for calls that are safe to repeat (a request id, or a repeat that finds
    the work done): an item whose node could not take it (moved, unavailable),
    or whose batch failed as a whole, is sent again alone with its own retries.
    """

    def __init__(self, *, owner: Callable[[Item], str | None],
                 alone: Callable[[Item, float | None], Awaitable[Answer]],
                 many: SendMany[Item, Answer | Refusal], refusal: type[Refusal],
                 error: Callable[[Refusal, str], MeshError], timeout: Callable[[], float],
                 max_batch: int, key: Callable[[Item], Hashable] | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT,
                 size: Callable[[Item], int] | None = None, max_bytes: int = 0) -> None:
        """``owner(item)``: the address of the node to batch it for, or None to send
        it alone (no map, coalescing off); ``alone(item, timeout)``: the call of its
        own; ``many``: one try of the batch call, whose items are answers or
        ``refusal`` messages that ``error(refusal, address)`` turns into the error
        the call alone would have raised; ``timeout()``: the client's default;
        ``key``, ``max_in_flight``, ``size`` and ``max_bytes`` as `Coalescer` takes them."""
        self._owner = owner
        self._alone = alone
        self._refusal = refusal
        self._error = error
        self._timeout = timeout
        self._coalescer: Coalescer[Item, Answer | Refusal] = Coalescer(
            self._one, many, max_batch, key, max_in_flight, size, max_bytes)

    async def _one(self, address: str, item: Item, budget: float) -> Answer | Refusal:
        return await self._alone(item, budget)

    async def __call__(self, item: Item, timeout: float | None) -> Answer:
        owner = self._owner(item)
        if owner is None:
            return await self._alone(item, timeout)
        loop = asyncio.get_running_loop()
        budget = self._timeout() if timeout is None else timeout
        deadline = loop.time() + budget
        answer: Answer | Refusal | None
        try:
            answer = await self._coalescer.call(owner, item, budget)
        except BatchFailed as failed:
            answer = None
            if deadline - loop.time() <= 0:
                raise failed.cause from None
        if isinstance(answer, self._refusal):
            error = self._error(answer, owner)
            if error.code not in ALONE_AGAIN and error.reason != "WRONG_OWNER":
                raise error
        elif answer is not None:
            return cast(Answer, answer)  # not a refusal: an answer
        # The batch failed, or the node could not take this item now: alone.
        return await self._alone(item, max(0.0, deadline - loop.time()))
