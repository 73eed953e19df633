"""The floor rows' parts (bench/relay_server.py, bench/report.py): what travels
together, and how a goal is set against its floor."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from bench import floor, report
from bench.relay_server import ACK, Batched, Disk, Link, add_relay_service
from bench.timing import Measurement, Workload

pytestmark = pytest.mark.timeout(10)


async def test_a_lone_item_goes_at_once_and_the_next_ones_wait_together() -> None:
    sent: list[list[int]] = []
    release = asyncio.Event()

    async def send(items: list[int]) -> None:
        sent.append(items)
        await release.wait()

    batched = Batched(send)
    first = batched(1)
    await asyncio.sleep(0)
    assert sent == [[1]]  # sent without waiting for company
    rest = [batched(i) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    assert sent == [[1]]  # one send in flight: the others gather
    release.set()
    await asyncio.gather(first, *rest)
    assert sent == [[1], [2, 3, 4]]


async def test_a_failed_send_reaches_each_of_its_callers_and_the_next_send_goes() -> None:
    calls = 0

    async def send(items: list[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("the stream broke")

    batched = Batched(send)
    failed = [batched("a"), batched("b")]
    for future in failed:
        with pytest.raises(ConnectionError):
            await future
    await batched("c")
    assert calls == 2


async def test_three_in_process_servers_relay_to_both_peers_and_commit(tmp_path: Path) -> None:
    """Call is answered once the peers its writes name acknowledged (and both
    sides committed) their messages; a process's writes go to both of its
    peers; Echo answers at once."""
    servers, addresses = [], []
    for _ in range(floor.SIZE):
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    disks = [Disk(tmp_path / f"relay-{i}.db") for i in range(floor.SIZE)]
    links = [[Link(addresses[(i + peer) % floor.SIZE], disks[i])
              for peer in range(1, floor.SIZE)] for i in range(floor.SIZE)]
    for server, own, disk in zip(servers, links, disks, strict=True):
        add_relay_service(server, own, disk)
        await server.start()
    try:
        async with floor.connected(addresses) as relays:
            before = [link.messages for own in links for link in own]
            writes = relays.replicated()
            await asyncio.gather(*(writes() for _ in range(20)))
            after = [link.messages for own in links for link in own]
            assert all(a > b for a, b in zip(after, before, strict=True))
            await relays.unreplicated()()
            await relays.cycles(4)()
        async with grpc.aio.insecure_channel(addresses[0]) as channel:
            echo = channel.unary_unary("/floor.Relay/Echo")
            assert await echo(b"x") == ACK
        for disk in disks:  # every message committed on the sender and the receiver
            assert disk.rows() > 0
    finally:
        for own in links:
            for link in own:
                await link.close()
        for server in servers:
            await server.stop(0)


def test_a_goal_is_set_against_its_floor() -> None:
    comparisons = {"lock.r1.seq": {"ratio": 0.6}, "set.r1sync.c64": {"ratio": 0.5}}
    floors = {"floor.lock.seq": {"ratio": 1.2}}
    goals = report.goals(comparisons, floors)
    assert goals["lock.r1.seq"] == {"min_ratio": 1.0, "ratio": 0.6, "met": False,
                                    "floor_ratio": 1.2, "of_floor": 0.5}
    assert "floor_ratio" not in goals["set.r1sync.c64"]  # its floor did not run
    assert set(report.FLOORS) <= set(report.GOALS)
    assert set(report.FLOORS.values()) == {c.key for c in report.FLOOR_COMPARISONS}


def test_a_goal_row_reports_its_ratio_round_by_round() -> None:
    # Three interleaved rounds of 1 s; 16 locks in parallel against etcd's lock.
    mesh = Measurement(Workload("cluster.lock.r1.c16", "", _never, 16), ops=4_590,
                       seconds=3.0, rounds=(1_560.0, 1_470.0, 1_560.0))
    etcd = Measurement(Workload("etcd.lock.c16", "", _never, 16), ops=3_000,
                       seconds=3.0, rounds=(1_000.0, 1_000.0, 1_000.0))
    by_name = {m.workload.name: m for m in (mesh, etcd)}
    comparisons = report._compare(by_name, [c for c in report.COMPARISONS
                                            if c.key == "lock.r1.c16"])
    assert comparisons["lock.r1.c16"]["ratio"] == 1.53
    assert comparisons["lock.r1.c16"]["round_ratios"] == [1.56, 1.47, 1.56]
    goals = report.goals(comparisons)
    assert goals["lock.r1.c16"]["met"] and goals["lock.r1.c16"]["rounds_met"] == 2
    line, = report.goal_lines(comparisons, goals)
    assert line.endswith("met. Round by round 1.47x-1.56x, 2 of 3 at or past the goal.")
    # keys/s rows scale each round by what an operation carries; under two rounds: none
    mget = Measurement(Workload("m", "", _never, batch=100), ops=10, seconds=1.0,
                       rounds=(10.0, 20.0))
    pipe = Measurement(Workload("p", "", _never, batch=50), ops=10, seconds=1.0,
                       rounds=(10.0, 10.0))
    assert report.round_ratios(mget, pipe, "keys/s") == [2.0, 4.0]
    assert report.round_ratios(mget, pipe, "calls/s") == [1.0, 2.0]
    assert report.round_ratios(_timed("a", 1.0), _timed("b", 1.0), "calls/s") == []
    one = Measurement(Workload("o", "", _never), ops=10, seconds=1.0, rounds=(10.0,))
    assert report.round_ratios(one, one, "calls/s") == []


def _timed(name: str, ops_per_s: float) -> Measurement:
    return Measurement(Workload(name, name, _never), ops=int(ops_per_s * 10), seconds=10.0)


async def _never() -> None:
    raise AssertionError("not run")


def test_a_sequential_lock_call_splits_into_parts_that_add_up() -> None:
    # Cycles/s (two calls each): a 1,000 us typed call, an 800 us stub call, a
    # 500 us unreplicated stub call; the floor: 600 us relayed, 400 us echoed.
    rates = {"cluster.lock.r1.seq": 500.0, "stub.lock.r1.seq": 625.0,
             "stub.lock.r0.seq": 1000.0, "floor.lock.seq": 1e6 / 1200,
             "floor.echo.seq": 1250.0}
    by_name = {name: _timed(name, rate) for name, rate in rates.items()}
    split = report.lock_seq_split(by_name)
    assert split == {"mesh_us": 1000.0, "floor_us": 600.0, "node_us": 100.0,
                     "replication_us": 100.0, "client_us": 200.0}
    assert split["floor_us"] + split["node_us"] + split["replication_us"] \
        + split["client_us"] == split["mesh_us"]
    assert "1000 in all" in report.lock_seq_lines(split)[1]
    del by_name["floor.echo.seq"]  # a part did not run: no split
    assert report.lock_seq_split(by_name) is None
    assert report.lock_seq_lines(None) == []
