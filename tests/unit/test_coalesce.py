"""Coalescing (clients/coalesce.py): which calls travel together, and what each caller gets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest

from clients.coalesce import BatchFailed, Coalescer, chunks
from clients.errors import InvalidArgumentError, MeshError, UnavailableError

pytestmark = pytest.mark.timeout(10)


def approx(budget: float) -> object:
    """A budget as sent: the caller's, less the microseconds spent coalescing."""
    return pytest.approx(budget, abs=0.05)


class Node:
    """Records the calls a coalescer makes; answers ``item * 10`` per item."""

    def __init__(self, fail: MeshError | None = None) -> None:
        self.ones: list[tuple[str, int, float]] = []
        self.manys: list[tuple[str, list[int], float]] = []
        self.fail = fail

    async def one(self, address: str, item: int, budget: float) -> int:
        self.ones.append((address, item, budget))
        if self.fail:
            raise self.fail
        return item * 10

    async def many(self, address: str, items: list[int], budget: float) -> Sequence[int]:
        self.manys.append((address, list(items), budget))
        await asyncio.sleep(0)
        if self.fail:
            raise self.fail
        return [i * 10 for i in items]


def unavailable() -> MeshError:
    return UnavailableError("node went away", code=grpc.StatusCode.UNAVAILABLE)


async def test_calls_made_in_one_turn_travel_as_one_batch_per_node() -> None:
    node = Node()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100)
    calls = [c.call("a", i, 5.0) for i in range(5)] + [c.call("b", 7, 5.0)]
    assert await asyncio.gather(*calls) == [0, 10, 20, 30, 40, 70]
    assert node.manys == [("a", [0, 1, 2, 3, 4], approx(5.0))]
    assert node.ones == [("b", 7, approx(5.0))]  # alone: sent as the ordinary call


async def test_tasks_that_call_together_are_batched_together() -> None:
    node = Node()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100)

    async def caller(i: int) -> list[int]:
        return [await c.call("a", i * 100 + n, 5.0) for n in range(3)]

    results = await asyncio.gather(*(caller(i) for i in range(8)))
    assert results == [[(i * 100 + n) * 10 for n in range(3)] for i in range(8)]
    # Each round's replies wake the callers together, so the next round meets again.
    assert [len(items) for _, items, _ in node.manys] == [8, 8, 8]
    assert node.ones == []


async def test_a_batch_carries_its_shortest_deadline_and_splits_at_max_batch() -> None:
    node = Node()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=3)
    budgets = [5.0, 2.0, 4.0, 1.0, 3.0]
    await asyncio.gather(*(c.call("a", i, b) for i, b in enumerate(budgets)))
    assert node.manys == [("a", [0, 1, 2], approx(2.0)), ("a", [3, 4], approx(1.0))]


async def test_a_batch_bounded_in_bytes_never_holds_more() -> None:
    node = Node()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100,
                                       size=lambda i: i, max_bytes=10)
    assert await asyncio.gather(*(c.call("a", i, 5.0) for i in (4, 6, 1, 3))) == [
        40, 60, 10, 30]
    # 4 and 6 fill the first batch; 1 would pass 10 bytes, so it opens the next.
    assert node.manys == [("a", [4, 6], approx(5.0)), ("a", [1, 3], approx(5.0))]
    # An item larger than any batch may be goes as the ordinary call.
    assert await c.call("a", 12, 5.0) == 120
    assert node.ones == [("a", 12, approx(5.0))]


async def test_a_failed_batch_tells_every_caller_to_go_alone() -> None:
    error = unavailable()
    node = Node(fail=error)
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100)
    outcomes = await asyncio.gather(*(c.call("a", i, 5.0) for i in range(3)),
                                    return_exceptions=True)
    assert all(isinstance(o, BatchFailed) and o.cause is error for o in outcomes)


async def test_a_lone_call_fails_with_its_own_error() -> None:
    error = InvalidArgumentError("bad key", code=grpc.StatusCode.INVALID_ARGUMENT)
    c: Coalescer[int, int] = Coalescer(Node(fail=error).one, Node().many, max_batch=100)
    with pytest.raises(InvalidArgumentError):
        await c.call("a", 1, 5.0)


async def test_a_cancelled_caller_leaves_the_others_their_results() -> None:
    node = Node()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100)
    tasks = [asyncio.create_task(c.call("a", i, 5.0)) for i in range(3)]
    await asyncio.sleep(0)  # all three have joined; the batch has not left yet
    tasks[0].cancel()  # its opener, even
    tasks[1].cancel()
    assert await tasks[2] == 20
    assert node.manys == [("a", [0, 1, 2], approx(5.0))]
    assert tasks[0].cancelled() and tasks[1].cancelled()


async def test_items_with_equal_keys_never_share_a_batch() -> None:
    node = Node()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100, key=lambda i: i % 10)
    assert await asyncio.gather(*(c.call("a", i, 5.0) for i in (1, 2, 11, 3))) == [
        10, 20, 110, 30]
    assert node.manys == [("a", [1, 2, 3], approx(5.0))]
    assert node.ones == [("a", 11, approx(5.0))]  # 11 repeats 1's key: it went alone


class SlowNode(Node):
    """Answers a call only when the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def one(self, address: str, item: int, budget: float) -> int:
        await self.release.wait()
        return await super().one(address, item, budget)

    async def many(self, address: str, items: list[int], budget: float) -> Sequence[int]:
        await self.release.wait()
        return await super().many(address, items, budget)


async def test_calls_made_while_a_node_is_busy_gather_into_the_next_batch() -> None:
    node = SlowNode()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100, max_in_flight=1)
    first = asyncio.create_task(c.call("a", 0, 5.0))
    await asyncio.sleep(0.01)  # the lone first call is open
    later = [asyncio.create_task(c.call("a", i, 5.0)) for i in range(1, 4)]
    await asyncio.sleep(0.01)  # ...and the next three, over several turns, wait for it
    other = asyncio.create_task(c.call("b", 9, 5.0))  # another node is not held up
    await asyncio.sleep(0.01)
    later.append(asyncio.create_task(c.call("a", 4, 5.0)))
    await asyncio.sleep(0.01)
    assert node.ones == [] and node.manys == []
    node.release.set()
    assert await asyncio.gather(first, *later, other) == [0, 10, 20, 30, 40, 90]
    assert node.ones == [("a", 0, approx(5.0)), ("b", 9, approx(5.0))]
    assert node.manys == [("a", [1, 2, 3, 4], approx(5.0))]


class OpenCalls(SlowNode):
    """A SlowNode that counts the calls open on it."""

    def __init__(self) -> None:
        super().__init__()
        self.open = 0

    async def one(self, address: str, item: int, budget: float) -> int:
        self.open += 1
        try:
            return await super().one(address, item, budget)
        finally:
            self.open -= 1

    async def many(self, address: str, items: list[int], budget: float) -> Sequence[int]:
        self.open += 1
        try:
            return await super().many(address, items, budget)
        finally:
            self.open -= 1


async def test_with_two_calls_allowed_a_batch_leaves_while_one_is_open() -> None:
    node = OpenCalls()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100, max_in_flight=2)
    first = asyncio.create_task(c.call("a", 0, 5.0))
    await asyncio.sleep(0.01)
    assert node.open == 1  # the lone first call
    second = [asyncio.create_task(c.call("a", i, 5.0)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    assert node.open == 2  # went at once, beside it
    third = [asyncio.create_task(c.call("a", i, 5.0)) for i in (3, 4)]
    await asyncio.sleep(0.01)
    assert node.open == 2  # waits for one of them
    node.release.set()
    assert await asyncio.gather(first, *second, *third) == [0, 10, 20, 30, 40]
    assert [items for _, items, _ in node.manys] == [[1, 2], [3, 4]]


async def test_a_waiting_batch_leaves_when_its_deadline_is_up() -> None:
    node = SlowNode()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=100, max_in_flight=1)
    busy = asyncio.create_task(c.call("a", 0, 5.0))
    await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(c.call("a", i, 5.0)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    # A caller with a short deadline joins: the batch measures its wait again and
    # leaves (over the limit) when that deadline is up, with what is left of it.
    waiting.append(asyncio.create_task(c.call("a", 3, 0.1)))
    await asyncio.sleep(0.3)
    assert [(items, budget) for _, items, budget in node.manys] == []  # still blocked
    node.release.set()
    assert await asyncio.gather(busy, *waiting) == [0, 10, 20, 30]
    [(_, items, budget)] = node.manys
    assert items == [1, 2, 3] and budget == pytest.approx(0.001)


async def test_a_cancelled_waiting_batch_passes_its_turn_on() -> None:
    node = SlowNode()
    c: Coalescer[int, int] = Coalescer(node.one, node.many, max_batch=1, max_in_flight=1)
    busy = asyncio.create_task(c.call("a", 0, 5.0))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(c.call("a", 1, 5.0))  # max_batch 1: each waits alone
    await asyncio.sleep(0.01)
    kept = asyncio.create_task(c.call("a", 2, 5.0))
    await asyncio.sleep(0.01)
    gone.cancel()
    node.release.set()
    assert [await busy, await kept] == [0, 20]
    assert gone.cancelled()
    assert [item for _, item, _ in node.ones] == [0, 2]


def test_a_pipeline_cuts_a_wave_where_a_key_repeats() -> None:
    from clients.cache_pipeline import _Command, _waves

    async def nothing() -> None:
        return None

    commands = [_Command(k, nothing) for k in ("a", "b", "a", "c", "b", "b")]
    assert [[c.key for c in wave] for wave in _waves(commands)] == [
        ["a", "b"], ["a", "c", "b"], ["b"]]
    assert _waves([]) == []


def test_chunks_cut_by_count_and_by_bytes() -> None:
    assert chunks([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    sizes = [4, 6, 1, 12, 3]
    # 12 is more than any chunk holds: alone, never dropped.
    assert chunks([0, 1, 2, 3, 4], 10, sizes, 10) == [[0, 1], [2], [3], [4]]
    assert chunks([], 10, sizes, 10) == []
