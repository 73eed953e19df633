"""The event store's acceptance scenarios, with real processes throughout.

Real etcd, a coordinator and three nodes (R = 1, 2 s leases). Appends go
through the raw generated stub, to any live node (a node that does not lead the
stream forwards), as a client in any language would; a retry resends the same
event ids, which makes it safe. The projection scenario runs the bank example's
read model in separate processes (tests/projection_worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import sqlite3
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.examples.bank import Bank, InsufficientFunds
from common.clustermap import read_map, wait_for_map, wait_settled
from common.slots import slot_for
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_pb2_grpc as pb_grpc
from tests.cluster import LiveNodes, error_details, workers

LEASE_TTL = 2
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED}


class Nodes(LiveNodes):
    """Raw EventsService stubs to the mesh's live nodes."""

    def stub(self, address: str | None = None) -> pb_grpc.EventsServiceStub:
        return pb_grpc.EventsServiceStub(self.channel(address))

    async def append(self, request: pb.AppendRequest, limit: float = 30.0
                     ) -> pb.AppendResponse:
        """Append, retrying with the same event ids until a definite answer."""
        async with asyncio.timeout(limit):
            while True:
                try:
                    response: pb.AppendResponse = await self.stub().Append(request, timeout=3.0)
                    return response
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE:
                        raise
                await asyncio.sleep(0.05)

    async def read(self, stream: str, limit: float = 30.0) -> list[pb.RecordedEvent]:
        """Every event of ``stream``, forward, page by page."""
        events: list[pb.RecordedEvent] = []
        after: int | None = None
        async with asyncio.timeout(limit):
            while True:
                request = pb.ReadRequest(stream=stream, max_count=1000)
                if after is not None:
                    request.from_version = after
                try:
                    page = await self.stub().Read(request, timeout=3.0)
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE:
                        raise
                    await asyncio.sleep(0.05)
                    continue
                events.extend(page.events)
                if page.end_of_stream or not page.events:
                    return events
                after = page.next_version


def events(n: int, tag: str = "e") -> list[pb.EventData]:
    return [pb.EventData(id=str(uuid.uuid4()), type="Happened", data=f"{tag}-{i}".encode())
            for i in range(n)]


def assert_contiguous(stream: str, stored: list[pb.RecordedEvent]) -> None:
    versions = [e.version for e in stored]
    assert versions == list(range(1, len(stored) + 1)), f"{stream}: {versions}"
    ids = [e.id for e in stored]
    assert len(set(ids)) == len(ids), f"{stream}: duplicate ids"


@pytest.fixture
async def mesh3(local_mesh: Any) -> Any:
    local = local_mesh(3, lease_ttl=LEASE_TTL)
    nodes = Nodes(local)
    try:
        yield local, nodes
    finally:
        await nodes.close()


async def test_two_writers_with_exact_versions_one_wins(mesh3: Any) -> None:
    _, nodes = mesh3
    stream = "acc-race-1"
    await nodes.append(pb.AppendRequest(stream=stream, events=events(1),
                                        expected_state=pb.EXPECTED_STATE_NO_STREAM))
    wins = conflicts = 0
    for version in range(1, 21):
        tries = [nodes.stub().Append(pb.AppendRequest(
            stream=stream, events=events(1, f"w{w}"), expected_state=pb.EXPECTED_STATE_EXACT,
            exact_version=version), timeout=5.0) for w in range(2)]
        results = await asyncio.gather(*tries, return_exceptions=True)
        ok = [r for r in results if isinstance(r, pb.AppendResponse)]
        bad = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) == 1 and len(bad) == 1, results
        assert ok[0].first_version == version + 1
        assert bad[0].code() == grpc.StatusCode.ABORTED
        assert error_details(bad[0])[0] == "VERSION_MISMATCH"
        wins += 1
        conflicts += 1
    stored = await nodes.read(stream)
    assert len(stored) == 21 and wins == conflicts == 20
    assert_contiguous(stream, stored)


async def test_append_retried_after_a_dropped_response_leaves_one_copy(mesh3: Any) -> None:
    _, nodes = mesh3
    stream = "acc-dropped-1"
    for attempt in itertools.count():
        assert attempt < 50, "the server never committed before the client went away"
        batch = events(3, f"a{attempt}")
        request = pb.AppendRequest(stream=stream, events=batch)
        call = nodes.stub().Append(request, timeout=5.0)
        await asyncio.sleep(0)  # sent
        await asyncio.sleep(0.002 * attempt)
        call.cancel()  # the response is dropped on the client's side
        for _ in range(40):  # did the server commit it anyway?
            stored = await nodes.read(stream)
            if any(e.id == batch[0].id for e in stored):
                break
            await asyncio.sleep(0.025)
        else:
            continue  # cancelled before the server acted: try again
        retried = await nodes.append(request)
        assert retried.duplicate
        stored = await nodes.read(stream)
        assert [e.id for e in stored].count(batch[0].id) == 1
        assert [e.id for e in stored[-3:]] == [e.id for e in batch]
        assert retried.last_version == stored[-1].version
        assert_contiguous(stream, stored)
        return


async def _burst(nodes: Nodes, streams: list[str], per_stream: int
                 ) -> dict[str, list[str]]:
    """Append ``per_stream`` events to each stream, in batches; the acked ids."""
    acked: dict[str, list[str]] = defaultdict(list)

    async def one(stream: str) -> None:
        left = per_stream
        while left:
            batch = events(min(left, random.randint(1, 5)), stream)
            await nodes.append(pb.AppendRequest(stream=stream, events=batch))
            acked[stream].extend(e.id for e in batch)
            left -= len(batch)
    await asyncio.gather(*(one(s) for s in streams))
    return acked


async def test_sigkill_every_node_then_restart_keeps_every_acked_event(mesh3: Any) -> None:
    local, nodes = mesh3
    streams = [f"acc-burst-{i}" for i in range(12)]
    acked = await _burst(nodes, streams, 40)
    ids = [n.node_id for n in local.nodes]
    for node in local.nodes:
        node.child.kill()  # SIGKILL, reaped
    local.nodes.clear()
    for node_id in ids:  # the same machines come back, with their disks
        await asyncio.to_thread(local.start_node, node_id)
    await wait_settled(local.etcd_endpoint, local.cluster, ids, timeout=60)

    for stream in streams:
        stored = await nodes.read(stream)
        assert [e.id for e in stored] == acked[stream], stream
        assert_contiguous(stream, stored)
    # ... and the store takes appends again, continuing each stream.
    more = await nodes.append(pb.AppendRequest(stream=streams[0], events=events(1)))
    assert more.first_version == len(acked[streams[0]]) + 1


async def test_sigkill_a_primary_under_append_load_loses_nothing(mesh3: Any) -> None:
    local, nodes = mesh3
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    victim = local.nodes[0]
    streams = [f"acc-load-{i}" for i in range(40)]
    led = [s for s in streams
           if (g := table.group_of_slot(slot_for(s))) is not None and g.primary == victim.node_id]
    assert led, "no stream led by the victim"
    acked: dict[str, list[str]] = defaultdict(list)
    stop = asyncio.Event()

    async def writer(stream: str) -> None:
        while not stop.is_set():
            batch = events(random.randint(1, 3), stream)
            await nodes.append(pb.AppendRequest(stream=stream, events=batch))
            acked[stream].extend(e.id for e in batch)

    tasks = [asyncio.create_task(writer(s)) for s in streams]
    try:
        await asyncio.sleep(1.0)
        victim.child.signal(signal.SIGKILL)
        await wait_for_map(local.etcd_endpoint, local.cluster,
                           lambda t: victim.node_id not in t.addresses, 30, "victim gone")
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert all(acked[s] for s in led)
    for stream in streams:
        stored = await nodes.read(stream)
        assert [e.id for e in stored] == acked[stream], stream
        assert_contiguous(stream, stored)


def _read_model(db: Path, accounts: list[str]) -> dict[str, tuple[int, int]]:
    """account -> (balance, events applied) in a projection's sqlite file."""
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT account, balance, events FROM balances").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return {}
    return {a: (b, n) for a, b, n in rows if a in accounts}


async def test_a_killed_projection_process_ends_with_the_same_read_model(
    mesh3: Any, mesh_client: Any, tmp_path: Path
) -> None:
    local, _ = mesh3
    bank = Bank(await mesh_client(cluster=local.cluster, timeout=10))
    accounts = [f"proj{uuid.uuid4().hex[:6]}-{i}" for i in range(6)]
    for account in accounts:
        await bank.open_account(account, "owner")

    async def commands(count: int) -> None:
        for _ in range(count):
            account = random.choice(accounts)
            if random.random() < 0.7:
                await bank.deposit(account, random.randint(1, 100))
            else:
                with contextlib.suppress(InsufficientFunds):
                    await bank.withdraw(account, random.randint(1, 100))

    steady_db, killed_db = tmp_path / "steady.db", tmp_path / "killed.db"
    async with workers(local, tmp_path, "tests.projection_worker") as start:
        steady = await start(str(steady_db))
        killed = await start(str(killed_db))
        await steady.line("RUNNING")
        await killed.line("RUNNING")
        load = asyncio.create_task(commands(240))
        async with asyncio.timeout(60):  # let it apply part of the stream, then kill it
            while True:
                model = await asyncio.to_thread(_read_model, killed_db, accounts)
                if sum(n for _, n in model.values()) >= 40:
                    break
                await asyncio.sleep(0.05)
        killed.signal(signal.SIGKILL)
        await killed.process.wait()
        await (await start(str(killed_db))).line("RUNNING")
        await load

        truth = {}
        for account in accounts:
            state = await bank.load(account)
            truth[account] = (state.balance, state.version)
        async with asyncio.timeout(60):
            while True:
                steady_model = await asyncio.to_thread(_read_model, steady_db, accounts)
                killed_model = await asyncio.to_thread(_read_model, killed_db, accounts)
                if steady_model == truth and killed_model == truth:
                    break
                await asyncio.sleep(0.1)
