"""The event store through the typed client, against real node processes: appends
and reads, read_all across slots, subscriptions (catch-up then live, category
over three nodes, a failover), the projection runner restarted mid-way, the
bank example, and the blocking facade."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from clients import (
    NO_STREAM,
    STREAM_EXISTS,
    CaughtUp,
    DuplicateEventIdError,
    FailedPreconditionError,
    Mesh,
    NewEvent,
    ProjectionRunner,
    RecordedEvent,
    SqliteCheckpointStore,
    StreamDeletedError,
    Subscription,
    WrongExpectedVersionError,
)
from clients.examples import bank
from clients.sync import SyncMesh
from common.localmesh import LocalMesh
from common.slots import slot_for

Connect = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def mesh(shared_cluster: LocalMesh, mesh_client: Connect) -> Mesh:
    return await mesh_client(cluster=shared_cluster.cluster)


def _streams_on_every_node(mesh: Mesh, prefix: str, per_node: int = 3) -> list[str]:
    """Stream ids in ``prefix`` led by each primary in turn."""
    table = mesh.table
    assert table is not None
    primaries = sorted({g.primary for g in table.groups.values()})
    streams = []
    for node in primaries:
        found = 0
        for i in range(10_000):
            stream = f"{prefix}{node}-{i}"
            group = table.group_of_slot(slot_for(stream))
            if group is not None and group.primary == node:
                streams.append(stream)
                found += 1
                if found == per_node:
                    break
    return streams


async def _take(sub: Subscription, count: int, timeout: float = 20.0) -> list[RecordedEvent]:
    """The next ``count`` events (markers skipped)."""
    events: list[RecordedEvent] = []

    async def collect() -> None:
        async for item in sub:
            if isinstance(item, RecordedEvent):
                events.append(item)
                if len(events) == count:
                    return

    await asyncio.wait_for(collect(), timeout)
    return events


async def test_append_read_and_errors(mesh: Mesh) -> None:
    ev = mesh.events
    stream = "order-client-1"
    placed = NewEvent("OrderPlaced", {"total": 5}, metadata={"user": "u1"})
    paid = NewEvent("OrderPaid", b"raw")
    first = await ev.append(stream, [placed, paid], NO_STREAM)
    assert (first.first_version, first.last_version, first.slot) == (1, 2, slot_for(stream))
    assert first.position >= 2 and not first.duplicate
    retry = await ev.append(stream, [placed, paid], NO_STREAM)  # same ids: a replay
    assert retry == first.__class__(1, 2, first.slot, first.position, True)

    with pytest.raises(WrongExpectedVersionError) as wrong:
        await ev.append(stream, NewEvent("Late"), 1)
    assert wrong.value.stream_exists and wrong.value.current_version == 2
    with pytest.raises(WrongExpectedVersionError):
        await ev.append(stream, NewEvent("Late"), NO_STREAM)
    with pytest.raises(DuplicateEventIdError):
        await ev.append(stream, [placed, NewEvent("New")])
    exact = await ev.append(stream, [NewEvent("Shipped"), NewEvent("Delivered")], 2)
    assert (exact.first_version, exact.last_version) == (3, 4)

    page = await ev.read(stream, max_count=2)
    assert [e.version for e in page.events] == [1, 2] and not page.end
    assert page.events[0].json() == {"total": 5}
    assert page.events[0].metadata_json() == {"user": "u1"}
    assert page.events[0].content_type == "application/json"
    assert page.events[1].content_type == "application/octet-stream"
    assert page.last == exact.last_version and page.stream_exists
    forward = [e.version async for e in ev.read_stream(stream, page_size=2)]
    assert forward == list(range(1, exact.last_version + 1))
    backward = [e.version async for e in ev.read_stream(stream, backward=True, page_size=2)]
    assert backward == forward[::-1]
    missing = await ev.read("order-client-none")
    assert (missing.events, missing.stream_exists, missing.last) == ([], False, 0)

    version = await ev.set_stream_metadata(stream, max_count=2)
    meta = await ev.get_stream_metadata(stream)
    assert (meta.max_count, meta.metadata_version) == (2, version)
    kept = [e.version async for e in ev.read_stream(stream)]
    assert kept == forward[-2:]

    assert await ev.delete_stream(stream, STREAM_EXISTS) == exact.last_version
    assert not (await ev.read(stream)).stream_exists
    recreated = await ev.append(stream, NewEvent("Reopened"), NO_STREAM)
    assert recreated.first_version == exact.last_version + 1
    await ev.tombstone_stream(stream)
    with pytest.raises(StreamDeletedError):
        await ev.append(stream, NewEvent("Again"))
    with pytest.raises(StreamDeletedError):
        await ev.read(stream)


async def test_read_all_merges_every_slot(mesh: Mesh) -> None:
    streams = _streams_on_every_node(mesh, "readall-")
    for round_ in range(3):
        for stream in streams:
            await mesh.events.append(stream, NewEvent("Tick", {"round": round_}))
    started = time.monotonic()
    everything = [e async for e in mesh.events.read_all()]
    elapsed = time.monotonic() - started
    print(f"\nread_all: {len(everything)} events in {elapsed:.2f} s")
    mine = [e for e in everything if e.stream.startswith("readall-")]
    assert len(mine) == 3 * len(streams)
    assert everything == sorted(everything, key=lambda e: (e.create_time, e.slot, e.position))
    for stream in streams:
        assert [e.version for e in mine if e.stream == stream] == [1, 2, 3]
    slots = {slot_for(s) for s in streams[:2]}
    some = [e async for e in mesh.events.read_all(slots=slots)]
    assert {e.slot for e in some} == slots


async def test_stream_subscription_catch_up_then_live(mesh: Mesh) -> None:
    stream = "live-client-1"
    await mesh.events.append(stream, [NewEvent("Old", {"n": n}) for n in range(30)])
    items: list[Any] = []
    async with mesh.events.subscribe(stream, include_markers=True) as sub:
        async def writer() -> None:
            for n in range(30, 60):
                await mesh.events.append(stream, NewEvent("New", {"n": n}))

        writing = asyncio.create_task(writer())
        async for item in sub:
            items.append(item)
            if isinstance(item, RecordedEvent) and item.version == 60:
                break
        await writing
        assert sub.version == 60
    events = [i for i in items if isinstance(i, RecordedEvent)]
    assert [e.version for e in events] == list(range(1, 61))
    assert [e.json()["n"] for e in events] == list(range(60))
    assert sum(isinstance(i, CaughtUp) for i in items) == 1

    # Resuming after a version gives exactly what follows it.
    async with mesh.events.subscribe(stream, after_version=55) as sub:
        assert [e.version for e in await _take(sub, 5)] == [56, 57, 58, 59, 60]


async def test_category_subscription_across_three_nodes(mesh: Mesh) -> None:
    streams = _streams_on_every_node(mesh, "cat-client-")
    for stream in streams:
        await mesh.events.append(stream, NewEvent("Before"))
    await mesh.events.append("other-client-1", NewEvent("NotMine"))
    async with mesh.events.subscribe(category="cat-client-", include_markers=True) as sub:
        caught: list[RecordedEvent] = []
        async for item in sub:
            if isinstance(item, CaughtUp):
                break
            if isinstance(item, RecordedEvent):
                caught.append(item)
        assert sorted(e.stream for e in caught) == sorted(streams)
        for stream in streams:
            await mesh.events.append(stream, NewEvent("After"))
        live = await _take(sub, len(streams))
        assert sorted(e.stream for e in live) == sorted(streams)
        assert {e.type for e in live} == {"After"}
        positions = dict(sub.positions)

    # The saved positions resume right after what was delivered.
    await mesh.events.append(streams[0], NewEvent("Later"))
    async with mesh.events.subscribe(category="cat-client-", after_positions=positions) as sub:
        [later] = await _take(sub, 1)
        assert (later.stream, later.type) == (streams[0], "Later")


async def _projection_rows(store: SqliteCheckpointStore) -> list[tuple[object, ...]]:
    return await store.query("SELECT stream, n, last FROM counts ORDER BY stream")


def _count_setup(conn: Any) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS counts "
                 "(stream TEXT PRIMARY KEY, n INTEGER, last INTEGER)")


def _count(conn: Any, event: RecordedEvent) -> None:
    conn.execute("INSERT INTO counts VALUES (?, 1, ?) ON CONFLICT (stream) DO UPDATE "
                 "SET n = n + 1, last = excluded.last", (event.stream, event.version))


async def test_projection_restarted_midway_matches_an_uninterrupted_one(
    mesh: Mesh, tmp_path: Path
) -> None:
    streams = _streams_on_every_node(mesh, "proj-client-", per_node=2)

    async def append(rounds: range) -> None:
        for r in rounds:
            await asyncio.gather(*(mesh.events.append(s, NewEvent("Tick", {"r": r}))
                                   for s in streams))

    def runner(store: SqliteCheckpointStore) -> ProjectionRunner:
        return ProjectionRunner(mesh, "counts", _count, category="proj-client-", store=store,
                                setup=_count_setup, batch_size=5)

    await append(range(0, 10))
    interrupted = SqliteCheckpointStore(tmp_path / "interrupted.db")
    first = runner(interrupted)
    task = asyncio.create_task(first.run())
    await append(range(10, 20))
    task.cancel()  # wherever it is: mid-batch, mid-commit, waiting
    with pytest.raises(asyncio.CancelledError):
        await task
    # What is committed is the truth (a commit running when the task was cancelled
    # completes in its thread, uncounted by `processed`).
    [(stopped_at,)] = await interrupted.query("SELECT coalesce(sum(n), 0) FROM counts")
    assert isinstance(stopped_at, int) and stopped_at >= first.processed
    await append(range(20, 30))
    second = runner(interrupted)
    assert await second.run_until_caught_up() == 30 * len(streams) - stopped_at

    whole = SqliteCheckpointStore(tmp_path / "whole.db")
    assert await runner(whole).run_until_caught_up() == 30 * len(streams)
    rows = await _projection_rows(interrupted)
    assert rows == await _projection_rows(whole)
    assert rows == [(s, 30, 30) for s in sorted(streams)]
    await interrupted.close()
    await whole.close()


async def test_bank_example(mesh: Mesh, tmp_path: Path) -> None:
    balances = await bank.demo(mesh, tmp_path / "bank.db")
    alice, bob, carol = sorted(balances)
    assert (balances[alice], balances[bob]) == (20_00, 50_00)
    # Carol: 50.00, then ten deposits of 1.00 racing ten withdrawals of 10.00; some
    # withdrawals are refused, none overdraws, none is lost.
    assert balances[carol] >= 0 and (60_00 - balances[carol]) % 10_00 == 0
    accounts = bank.Bank(mesh)
    for account, balance in balances.items():
        assert (await accounts.load(account)).balance == balance


def test_sync_facade(shared_cluster: LocalMesh) -> None:
    with SyncMesh(etcd=shared_cluster.etcd_endpoint, cluster=shared_cluster.cluster) as sync:
        result = sync.events.append("sync-client-1", [NewEvent("A"), NewEvent("B")])
        assert result.last_version == 2
        assert [e.type for e in sync.events.read_stream("sync-client-1")] == ["A", "B"]
        with sync.events.subscribe("sync-client-1") as sub:
            seen = []
            for item in sub:
                assert isinstance(item, RecordedEvent)
                seen.append(item.version)
                if item.version == 2:
                    break
            assert seen == [1, 2] and sub.version == 2


async def test_subscriptions_survive_failover(local_mesh: Any, mesh_client: Connect) -> None:
    """A primary is killed: a stream subscription and a category subscription resume
    on the promoted replicas with no event lost or repeated."""
    local = local_mesh(3, lease_ttl=2)
    mesh = await mesh_client(timeout=15)
    victim = local.nodes[0]
    streams = _streams_on_every_node(mesh, "fo-", per_node=1)
    table = mesh.table
    assert table is not None
    [stream] = [s for s in streams
                if (g := table.group_of_slot(slot_for(s))) and g.primary == victim.node_id]
    last: dict[str, int] = {}

    async def writer(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for s in streams:
                last[s] = (await mesh.events.append(s, NewEvent("Tick"))).last_version
            await asyncio.sleep(0.01)

    async with mesh.events.subscribe(stream) as one, \
            mesh.events.subscribe(category="fo-") as category:
        stop = asyncio.Event()
        writing = asyncio.create_task(writer(stop))
        received = await _take(one, 20)
        victim.child.signal(signal.SIGKILL)
        received += await _take(one, 40, timeout=30)
        stop.set()
        await writing
        if received[-1].version < last[stream]:
            received += await _take(one, last[stream] - received[-1].version)
        by_category = await _take(category, sum(last.values()))
    assert [e.version for e in received] == list(range(1, last[stream] + 1))
    for s in streams:
        assert [e.version for e in by_category if e.stream == s] == list(range(1, last[s] + 1))


async def test_fixed_addresses(shared_cluster: LocalMesh, mesh_client: Connect) -> None:
    """Without the map, one node forwards single-stream calls; a category subscription,
    which no node can forward, says it needs the map."""
    mesh = await mesh_client(addresses=[shared_cluster.nodes[0].address], timeout=5)
    mapped = await mesh_client(cluster=shared_cluster.cluster)
    stream = next(s for s in _streams_on_every_node(mapped, "fixed-", per_node=1)
                  if not s.startswith(f"fixed-{shared_cluster.nodes[0].node_id}-"))
    await mesh.events.append(stream, [NewEvent("A"), NewEvent("B")])
    assert [e.type async for e in mesh.events.read_stream(stream)] == ["A", "B"]
    async with mesh.events.subscribe(stream) as sub:
        assert [e.version for e in await _take(sub, 2)] == [1, 2]
    with pytest.raises(FailedPreconditionError, match="needs the cluster map"):
        await mesh.events.subscribe(category="fixed-").start()
