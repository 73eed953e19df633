"""Pure logic of the event store client: slot ranges, positions, subscription
bookkeeping, and the projection runner's exactly-once commits (against a
scripted event source and a real sqlite3 file; no node)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any, cast

import grpc
import pytest

from clients import (
    ANY,
    NO_STREAM,
    CaughtUp,
    Checkpoint,
    FellBehind,
    InvalidArgumentError,
    NewEvent,
    RecordedEvent,
    Start,
    UnavailableError,
)
from clients.errors import ConflictError, FailedPreconditionError, from_rpc_error
from clients.event_subscription import (
    ALL_SLOTS,
    Subscription,
    SubscriptionTarget,
    _PartCaughtUp,
    _PartFellBehind,
    retryable,
    split_by_owner,
)
from clients.event_types import Item, Positions, expected_fields, merge_positions, to_ranges
from clients.mesh import Mesh
from clients.projection import ProjectionRunner, SqliteCheckpointStore
from common.errors import MeshStatusError, Reason
from common.slots import SLOT_COUNT, slot_for
from mesh.events.v1 import events_pb2 as pb

# -- slot ranges and positions -------------------------------------------------------


def test_to_ranges() -> None:
    assert to_ranges([]) == []
    assert to_ranges([5]) == [(5, 5)]
    assert to_ranges([3, 1, 2, 2, 7, 8, 10]) == [(1, 3), (7, 8), (10, 10)]
    assert to_ranges(range(SLOT_COUNT)) == [(0, SLOT_COUNT - 1)]


def test_split_by_owner_covers_each_slot_once() -> None:
    def owner(slot: int) -> str:
        return "a" if slot < 100 or slot >= 16000 else ("b" if slot % 2 else "c")

    plan = split_by_owner(range(SLOT_COUNT), owner)
    assert set(plan) == {"a", "b", "c"}
    assert plan["a"] == [(0, 99), (16000, SLOT_COUNT - 1)]
    covered = [s for ranges in plan.values() for a, b in ranges for s in range(a, b + 1)]
    assert sorted(covered) == list(range(SLOT_COUNT))
    assert all(owner(s) == address for address, ranges in plan.items()
               for a, b in ranges for s in range(a, b + 1))


def test_merge_positions_never_moves_back() -> None:
    positions: Positions = {1: 10, 2: 5}
    moved = merge_positions(positions, {1: 7, 2: 6, 3: 1, 4: 0})
    assert positions == {1: 10, 2: 6, 3: 1}
    assert moved == {2: 6, 3: 1}


def test_expected_fields() -> None:
    assert expected_fields(ANY) == {"expected_state": pb.EXPECTED_STATE_ANY}
    assert expected_fields(NO_STREAM) == {"expected_state": pb.EXPECTED_STATE_NO_STREAM}
    assert expected_fields(3) == {"expected_state": pb.EXPECTED_STATE_EXACT, "exact_version": 3}
    for bad in (0, -1, True):
        with pytest.raises(InvalidArgumentError):
            expected_fields(bad)


def test_new_event_wire_form() -> None:
    e = NewEvent("Deposited", {"amount": 5}, metadata={"user": "u"})
    wire = e.to_proto()
    assert (wire.type, wire.data, wire.metadata) == (
        "Deposited", b'{"amount":5}', b'{"user":"u"}')
    assert wire.content_type == "application/json" and len(wire.id) == 36
    raw = NewEvent("Blob", b"\x00\x01").to_proto()
    assert raw.content_type == "" and raw.data == b"\x00\x01"
    assert NewEvent("A").id != NewEvent("A").id


def _status_error(code: grpc.StatusCode, reason: str, metadata: dict[str, str]) -> Any:
    status = MeshStatusError(code, reason, Reason(reason), metadata).to_status()
    error = grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(),
                                 grpc.aio.Metadata(*status.trailing_metadata), status.details)
    return from_rpc_error(error, "10.0.0.1:1")


def test_event_errors_map_to_the_hierarchy() -> None:
    from clients import DuplicateEventIdError, StreamDeletedError

    dup = _status_error(grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_EVENT_ID", {})
    assert isinstance(dup, DuplicateEventIdError) and isinstance(dup, ConflictError)
    gone = _status_error(grpc.StatusCode.FAILED_PRECONDITION, "STREAM_DELETED", {})
    assert isinstance(gone, StreamDeletedError) and isinstance(gone, FailedPreconditionError)
    assert not retryable(gone)
    moved = _status_error(grpc.StatusCode.FAILED_PRECONDITION, "WRONG_OWNER", {"epoch": "3"})
    assert retryable(moved)
    assert retryable(UnavailableError("connection lost"))


# -- subscription bookkeeping --------------------------------------------------------


class _Router:
    """Just enough Mesh for planning: a map with owners by slot."""

    def __init__(self, owner: Callable[[int], str]) -> None:
        self.table = object()
        self.timeout = 1.0
        self._owner = owner

    def route_slot(self, service: str, slot: int) -> Any:
        return SimpleNamespace(address=self._owner(slot))


def _subscription(target: SubscriptionTarget, owner: Callable[[int], str] = lambda s: "a",
                  **kw: Any) -> Subscription:
    args: dict[str, Any] = dict(after_version=0, after_positions={}, start=Start.BEGINNING,
                                include_markers=True, checkpoint_interval=0, timeout=1.0)
    args.update(kw)
    return Subscription(cast(Mesh, _Router(owner)), target, **args)


def test_plan_splits_by_owner_and_resumes_from_positions() -> None:
    sub = _subscription(SubscriptionTarget(category="acct-"),
                        owner=lambda s: "a" if s < 8192 else "b",
                        after_positions={10: 4, 9000: 7})
    plan = sub._plan(set(ALL_SLOTS))
    by_address = {address: request for address, _, request in plan}
    assert set(by_address) == {"a", "b"} and len(plan) == 2
    a, b = by_address["a"], by_address["b"]
    assert [(r.start, r.end) for r in a.slots] == [(0, 8191)]
    assert [(r.start, r.end) for r in b.slots] == [(8192, SLOT_COUNT - 1)]
    assert dict(a.after_positions) == {10: 4} and dict(b.after_positions) == {9000: 7}
    assert a.category == "acct-" and a.start == pb.SUBSCRIBE_START_BEGINNING


def test_plan_from_end_keeps_known_slots_apart() -> None:
    """With start=END, slots with a known position resume from it; the others start
    at the end: two requests to the same owner."""
    sub = _subscription(SubscriptionTarget(), start=Start.END, after_positions={5: 2})
    plan = sub._plan(set(ALL_SLOTS))
    assert len(plan) == 2
    known = next(r for _, slots, r in plan if slots == {5})
    rest = next(r for _, slots, r in plan if slots != {5})
    assert known.start == pb.SUBSCRIBE_START_BEGINNING and dict(known.after_positions) == {5: 2}
    assert rest.start == pb.SUBSCRIBE_START_END and not rest.after_positions
    assert rest.WhichOneof("target") == "all"


def _recorded(stream: str, version: int, position: int, slot: int | None = None) -> RecordedEvent:
    return RecordedEvent(stream, version, slot_for(stream) if slot is None else slot, position,
                         f"id-{stream}-{version}", "Happened", b"{}", b"", "application/json",
                         1000.0 + position)


def test_caught_up_once_every_part_is_live() -> None:
    sub = _subscription(SubscriptionTarget(category="x-"))
    low, high = frozenset(range(8192)), frozenset(range(8192, SLOT_COUNT))
    assert sub._take(_PartCaughtUp(low, {3: 9}, 0)) is None  # half is not all
    assert sub._take(Checkpoint({8200: 4})) == Checkpoint({8200: 4})
    done = sub._take(_PartCaughtUp(high, {8200: 5}, 0))
    assert done == CaughtUp({3: 9, 8200: 5}, 0)
    assert sub._take(_PartCaughtUp(high, {8200: 5}, 0)) is None  # said once
    assert sub._take(_PartFellBehind(high)) == FellBehind()
    assert sub._take(_PartCaughtUp(high, {}, 0)) == CaughtUp({3: 9, 8200: 5}, 0)
    event = _recorded("x-1", 1, 10, slot=3)
    assert sub._take(event) is event and sub.positions[3] == 10


def test_stream_subscription_tracks_version() -> None:
    sub = _subscription(SubscriptionTarget(stream="order-1"), after_version=4)
    request = sub._request({slot_for("order-1")})
    assert request.stream == "order-1" and request.after_version == 4
    sub._take(_recorded("order-1", 5, 20))
    assert sub.version == 5
    caught = sub._take(_PartCaughtUp(frozenset({slot_for("order-1")}), {}, 7))
    assert caught == CaughtUp({slot_for("order-1"): 20}, 7) and sub.version == 7


# -- the projection runner, against a scripted source ---------------------------------


class FakeSubscription:
    """Replays ``items`` past the resume point, then waits (live, nothing new)."""

    def __init__(self, items: list[Item], stream: bool, after_version: int,
                 after_positions: Positions) -> None:
        def fresh(item: Item) -> bool:
            if not isinstance(item, RecordedEvent):
                return True
            if stream:
                return item.version > after_version
            return item.position > after_positions.get(item.slot, 0)

        self._items = [i for i in items if fresh(i)]
        self.closed = asyncio.Event()

    @property
    def buffered(self) -> int:
        return len(self._items)

    async def __aenter__(self) -> FakeSubscription:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        self.closed.set()

    def __aiter__(self) -> FakeSubscription:
        return self

    async def __anext__(self) -> Item:
        if self._items and not self.closed.is_set():
            return self._items.pop(0)
        await self.closed.wait()
        raise StopAsyncIteration


class FakeEvents:
    """``mesh.events`` with a fixed history; remembers each subscribe's resume point."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.calls: list[dict[str, Any]] = []

    def subscribe(self, stream: str | None = None, **kw: Any) -> FakeSubscription:
        self.calls.append({"stream": stream, **kw,
                           "after_positions": dict(kw["after_positions"])})
        return FakeSubscription(self.items, stream is not None, kw["after_version"],
                                dict(kw["after_positions"]))


def _history(streams: int = 5, per_stream: int = 8) -> list[Item]:
    """Category history: events spread over a few slots, then a checkpoint and CaughtUp."""
    items: list[Item] = []
    positions: Positions = {}
    for v in range(1, per_stream + 1):
        for s in range(streams):
            stream = f"acct-{s}"
            slot = slot_for(stream)
            positions[slot] = positions.get(slot, 0) + 1
            items.append(_recorded(stream, v, positions[slot]))
    items.append(Checkpoint({7: 100}))  # a slot with no matching events moved on
    items.append(CaughtUp({**positions, 7: 100}))
    return items


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS applied (stream TEXT, version INTEGER, "
                 "PRIMARY KEY (stream, version))")


def _apply(conn: sqlite3.Connection, event: RecordedEvent) -> None:
    # The primary key turns any double application into an IntegrityError.
    conn.execute("INSERT INTO applied VALUES (?, ?)", (event.stream, event.version))


def _runner(events: FakeEvents, store: SqliteCheckpointStore,
            handler: Callable[[sqlite3.Connection, RecordedEvent], None] = _apply,
            **kw: Any) -> ProjectionRunner:
    kw.setdefault("category", "acct-")
    return ProjectionRunner(cast(Mesh, SimpleNamespace(events=events)), "balances", handler,
                            store=store, setup=_setup, **kw)


async def _rows(store: SqliteCheckpointStore) -> list[tuple[object, ...]]:
    return await store.query("SELECT stream, version FROM applied ORDER BY stream, version")


async def test_runner_applies_everything_and_saves_positions(tmp_path: Path) -> None:
    history = _history()
    store = SqliteCheckpointStore(tmp_path / "model.db")
    runner = _runner(FakeEvents(history), store, batch_size=7)
    assert await runner.run_until_caught_up() == 40
    assert len(await _rows(store)) == 40
    saved = await store.load("balances")
    caught = history[-1]
    assert isinstance(caught, CaughtUp) and saved.positions == caught.positions
    assert saved.version == 0
    await store.close()


async def test_failed_handler_rolls_back_its_whole_batch(tmp_path: Path) -> None:
    """The handler's writes and the checkpoint share a transaction: a failure in the
    middle of a batch leaves neither; a restart redoes exactly that batch."""
    history = _history()
    store = SqliteCheckpointStore(tmp_path / "model.db")
    seen = 0

    def flaky(conn: sqlite3.Connection, event: RecordedEvent) -> None:
        nonlocal seen
        seen += 1
        if seen == 13:  # 2nd event of the 3rd batch of 5
            raise RuntimeError("boom")
        _apply(conn, event)

    with pytest.raises(RuntimeError, match="boom"):
        await _runner(FakeEvents(history), store, flaky, batch_size=5).run_until_caught_up()
    assert len(await _rows(store)) == 10
    checkpoint = await store.load("balances")
    applied = [e for e in history if isinstance(e, RecordedEvent)][:10]
    assert checkpoint.positions == {e.slot: max(x.position for x in applied if x.slot == e.slot)
                                    for e in applied}

    events = FakeEvents(history)
    assert await _runner(events, store, batch_size=5).run_until_caught_up() == 30
    assert events.calls[0]["after_positions"] == checkpoint.positions
    assert len(await _rows(store)) == 40  # no duplicate (the primary key would refuse it)
    await store.close()


class Counting:
    """A handler that applies events and sets ``reached`` (on the loop) after ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loop = asyncio.get_running_loop()
        self.reached = asyncio.Event()

    def __call__(self, conn: sqlite3.Connection, event: RecordedEvent) -> None:
        _apply(conn, event)
        self.n -= 1
        if self.n == 0:
            self.loop.call_soon_threadsafe(self.reached.set)


async def test_cancelled_runner_resumes_exactly(tmp_path: Path) -> None:
    """Killed at any point, a restarted runner ends with the same read model as one
    that never stopped."""
    history = _history(streams=6, per_stream=10)
    whole = SqliteCheckpointStore(tmp_path / "whole.db")
    await _runner(FakeEvents(history), whole, batch_size=4).run_until_caught_up()
    expected = await _rows(whole)

    store = SqliteCheckpointStore(tmp_path / "stopped.db")
    counting = Counting(20)
    task = asyncio.create_task(_runner(FakeEvents(history), store, counting, batch_size=4).run())
    await counting.reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = len(await _rows(store))
    assert 20 <= partial < 60
    await _runner(FakeEvents(history), store).run_until_caught_up()
    assert await _rows(store) == expected
    await whole.close()
    await store.close()


async def test_stop_commits_what_was_taken(tmp_path: Path) -> None:
    store = SqliteCheckpointStore(tmp_path / "model.db")
    counting = Counting(40)
    runner = _runner(FakeEvents(_history()), store, counting)
    task = asyncio.create_task(runner.run())
    await counting.reached.wait()
    await runner.stop()
    await task
    assert len(await _rows(store)) == 40
    assert (await store.load("balances")).positions[7] == 100
    await store.close()


async def test_stream_projection_checkpoints_versions(tmp_path: Path) -> None:
    history: list[Item] = [_recorded("order-1", v, 10 + v) for v in range(1, 6)]
    history.append(CaughtUp({}, 5))
    store = SqliteCheckpointStore(tmp_path / "model.db")
    assert await _runner(FakeEvents(history), store, category=None,
                         stream="order-1").run_until_caught_up() == 5
    assert (await store.load("balances")).version == 5
    events = FakeEvents(history)
    assert await _runner(events, store, category=None,
                         stream="order-1").run_until_caught_up() == 0
    assert events.calls[0]["after_version"] == 5
    await store.close()


async def test_handler_runs_off_the_event_loop_and_may_not_commit(tmp_path: Path) -> None:
    store = SqliteCheckpointStore(tmp_path / "model.db")
    threads: set[int] = set()

    def committing(conn: sqlite3.Connection, event: RecordedEvent) -> None:
        threads.add(threading.get_ident())
        conn.execute("COMMIT")

    with pytest.raises(RuntimeError, match="must not commit"):
        await _runner(FakeEvents(_history()), store, committing).run_until_caught_up()
    assert threading.get_ident() not in threads
    assert await store.load("balances") == (await store.load("nobody"))
    await store.close()
