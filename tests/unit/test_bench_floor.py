"""The floor rows' parts (bench/relay_server.py, bench/report.py): what travels
together, and how a goal is set against its floor."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from bench import floor, report
from bench.relay_server import ACK, Batched, Disk, Link, add_relay_service

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


async def test_a_ring_of_two_in_process_servers_relays_and_commits(tmp_path: Path) -> None:
    """Call is answered once the next server acknowledged (and both sides
    committed) its message; Echo at once."""
    servers, addresses = [], []
    for _ in range(2):
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    disks = [Disk(tmp_path / f"relay-{i}.db") for i in range(2)]
    links = [Link(addresses[(i + 1) % 2], disks[i]) for i in range(2)]
    for server, link, disk in zip(servers, links, disks, strict=True):
        add_relay_service(server, link, disk)
        await server.start()
    try:
        async with floor.connected(addresses) as ring:
            writes = ring.replicated()
            await asyncio.gather(*(writes() for _ in range(20)))
            await ring.unreplicated()()
            await ring.cycles(4)()
        async with grpc.aio.insecure_channel(addresses[0]) as channel:
            echo = channel.unary_unary("/floor.Relay/Echo")
            assert await echo(b"x") == ACK
        for disk in disks:  # every message committed on the sender and the receiver
            assert disk.rows() > 0
    finally:
        for link in links:
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
