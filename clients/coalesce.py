"""Coalescing: concurrent single-key calls bound for one node, sent as one batch call.

Sixty-four tasks that each ``await mesh.cache.get(key)`` (or ``set``) at once
would cost sixty-four RPCs, and in Python a gRPC call costs far more CPU, on
both ends, than the key it carries. Instead the first call for a node opens a
batch and yields one turn of the event loop, in which every other task that was
ready joins it; then the batch leaves as one call. Nothing waits on a timer, so
a lone call leaves one turn later, alone, as the call it always was; under load
the batches grow by themselves, because the replies to one batch wake its
callers together and their next calls meet again.

A batch that fails as a whole (its node went away, the map moved, one key was
refused) fails with `BatchFailed`; each caller then goes on alone with its own
retries and its own error, so coalescing never changes what a call returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from clients.errors import MeshError

Item = TypeVar("Item")
Result = TypeVar("Result")

SendOne = Callable[[str, Item, float], Awaitable[Result]]
"""send_one(address, item, budget): the ordinary call, retries and all, for a call
that turned out to be alone."""
SendMany = Callable[[str, list[Item], float], Awaitable[Sequence[Result]]]
"""send_many(address, items, budget): one try of the batch call, a result per item."""


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
    budget: float
    keys: set[Hashable] = field(default_factory=set)
    """The items' keys, when equal keys must not share a batch."""


class Coalescer(Generic[Item, Result]):
    """Per node, the calls made in one loop turn, sent together."""

    def __init__(self, send_one: SendOne[Item, Result], send_many: SendMany[Item, Result],
                 max_batch: int, key: Callable[[Item], Hashable] | None = None) -> None:
        """``key``: items with equal keys never share a batch (the second goes alone),
        for calls whose batch form would merge them (MSet keeps a repeated key's
        last value and gives every occurrence its version)."""
        self._send_one = send_one
        self._send_many = send_many
        self._max_batch = max_batch
        self._key = key
        self._pending: dict[str, _Batch[Item, Result]] = {}
        self._sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak refs

    async def call(self, address: str, item: Item, budget: float) -> Result:
        """This item's result: from a batch call, or from the ordinary call when it
        turns out to be alone. Raises `BatchFailed` if its batch failed as a whole."""
        batch = self._pending.get(address)
        if batch is not None and len(batch.items) < self._max_batch:
            if self._key is None:
                return await self._join(batch, item, budget)
            key = self._key(item)
            if key in batch.keys:
                return await self._send_one(address, item, budget)
            batch.keys.add(key)
            return await self._join(batch, item, budget)
        # The first call of the turn opens the batch, then yields once: every other
        # task that is ready in this turn runs, and those bound for this node join.
        opener: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        batch = self._pending[address] = _Batch([item], [opener], budget)
        if self._key is not None:
            batch.keys.add(self._key(item))
        try:
            await asyncio.sleep(0)
        finally:
            if self._pending.get(address) is batch:
                del self._pending[address]
            if len(batch.items) > 1:
                # In its own task, so that cancelling the opener (even right
                # here) cancels neither the batch nor the others' results.
                task = asyncio.get_running_loop().create_task(self._send(address, batch))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
        if len(batch.items) == 1:  # alone: no batch, no extra task
            return await self._send_one(address, item, batch.budget)
        return await opener

    @staticmethod
    async def _join(batch: _Batch[Item, Result], item: Item, budget: float) -> Result:
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        batch.items.append(item)
        batch.waiters.append(waiter)
        # A batch carries the shortest deadline among its callers, so none waits
        # past its own.
        batch.budget = min(batch.budget, budget)
        return await waiter

    async def _send(self, address: str, batch: _Batch[Item, Result]) -> None:
        waiters = batch.waiters
        try:
            results = await self._send_many(address, batch.items, batch.budget)
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
        for waiter, result in zip(waiters, results, strict=True):
            if not waiter.done():  # a caller that was cancelled meanwhile
                waiter.set_result(result)
