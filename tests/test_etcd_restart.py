"""The mesh survives etcd restarting under it, with no manual step and nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from clients import LockTimeoutError, Mesh, NewEvent
from common import localmesh
from common.clustermap import RoutingTable, read_map, wait_settled
from common.etcd import client_for
from common.localmesh import Etcd, LocalMesh
from tests.cluster import Writer, wait_converged
from tests.conftest import start_cluster


@contextlib.contextmanager
def _mesh_on_own_etcd(tmp_path: Path, cluster: str) -> Iterator[tuple[Etcd, LocalMesh]]:
    """An etcd of the test's own (to stop or pause) and three nodes on it (R = 1,
    2 s leases); every process's log printed if the test fails."""
    etcd = Etcd(tmp_path)
    etcd.start()
    local = LocalMesh(workdir=tmp_path, cluster=cluster, lease_ttl=2, _owns_workdir=False)
    local.etcd_endpoint = etcd.endpoint
    try:
        start_cluster(local, 3)
        yield etcd, local
    except BaseException:
        print(f"\n===== process logs =====\n{local.logs()}")
        raise
    finally:
        local.stop()
        etcd.stop()


async def test_mesh_recovers_when_etcd_restarts(tmp_path: Path) -> None:
    with _mesh_on_own_etcd(tmp_path, "restart") as (etcd, local):
        async with Mesh(etcd=etcd.endpoint, cluster="restart", timeout=20) as mesh:
            await mesh.cache.mset({f"k{i}": b"v" for i in range(500)})
            writer = Writer(mesh)
            writer.start()
            await asyncio.sleep(0.5)
            await writer.acked_at_least(30)

            etcd.stop()
            # Longer than every lease: primaries stop taking writes before their
            # lease could have run out, so nothing is acknowledged that a new
            # primary might not have.
            await asyncio.sleep(3)
            etcd.start()  # same port, same data dir

            # Nodes and the coordinator re-register and carry on; map changes work
            # again: a node joining now gets its share.
            fourth = await asyncio.to_thread(local.start_node)
            nodes = ["node-1", "node-2", "node-3", fourth.node_id]
            table = await wait_settled(etcd.endpoint, "restart", nodes, timeout=60)
            await asyncio.sleep(0.5)
            await writer.acked_at_least(len(writer.acked) + 30)
            await writer.stop()

            assert len(writer.acked) > 50
            assert await writer.lost() == []
            assert await mesh.cache.mget([f"k{i}" for i in range(500)]) == [b"v"] * 500
            await mesh.cache.set("after", b"restart")
            assert await mesh.cache.get("after") == b"restart"
            await wait_converged(table, local)


async def _settled_and_still(endpoint: str, cluster: str, nodes: list[str]) -> RoutingTable:
    """A settled map that no change follows for two seconds (the coordinator is
    done reacting to what happened)."""
    for _ in range(10):
        table = await wait_settled(endpoint, cluster, nodes, timeout=60)
        await asyncio.sleep(2)
        now = await read_map(endpoint, cluster)
        if now is not None and now.epoch == table.epoch:
            return table
    raise AssertionError(f"{cluster}: the map kept changing")


async def test_every_lease_lost_at_once_to_a_paused_etcd_loses_nothing(tmp_path: Path) -> None:
    """etcd paused (SIGSTOP) past every lease: when it runs again it ends them all
    at once, the coordinator's leadership too. The nodes never stopped and
    register again. Whether the next term sees them gone first (the map then
    loses every node and group, and the coordinator revives each group on the
    copies its members kept) or finds them back (the map stays), nothing is
    lost: events, cache values and a held lock's lease."""
    with _mesh_on_own_etcd(tmp_path, "paused") as (etcd, local):
        async with Mesh(etcd=etcd.endpoint, cluster="paused", timeout=20) as mesh:
            for i in range(20):
                await mesh.events.append(f"paused-{i % 4}", NewEvent("Kept", b"e", id=f"p{i}"))
            await mesh.cache.mset({f"paused-{i}": b"v" for i in range(200)})
            lease = await mesh.locks.acquire("paused", ttl=120)

            assert etcd.child is not None
            etcd.child.pause()
            try:
                await asyncio.sleep(6)  # three times the nodes' lease ttl
            finally:
                etcd.child.signal(signal.SIGCONT)
            nodes = ["node-1", "node-2", "node-3"]
            await _settled_and_still(etcd.endpoint, "paused", nodes)
            found = set()
            for stream in range(4):
                found.update([e.id async for e in mesh.events.read_stream(f"paused-{stream}")])
            assert found == {f"p{i}" for i in range(20)}
            assert await mesh.cache.mget([f"paused-{i}" for i in range(200)]) == [b"v"] * 200
            with pytest.raises(LockTimeoutError):
                await mesh.locks.acquire("paused", ttl=5, wait=0, owner="another")
            await lease.release()
            await wait_converged(await _settled_and_still(etcd.endpoint, "paused", nodes), local)


def test_an_etcd_whose_picked_port_was_taken_picks_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``free_port`` only says a port was free a moment ago: when another process
    binds it first, the harness's etcd starts on new ports instead of failing
    every test that shares it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, busy])  # the first client and peer ports: taken
        real = localmesh.free_port
        monkeypatch.setattr(localmesh, "free_port", lambda: next(picks, 0) or real())
        etcd = Etcd(tmp_path)
        try:
            etcd.start()
            assert busy not in (etcd.client_port, etcd.peer_port)
            assert etcd.alive()
        finally:
            etcd.stop()



@contextlib.asynccontextmanager
async def _slow_to_answer(upstream: str, delay: float) -> AsyncIterator[str]:
    """A loopback TCP relay to ``upstream`` that holds each connection's first
    answer back ``delay`` seconds, as a loaded host or a distant member does;
    yields its own address."""
    host, port = upstream.rsplit(":", 1)
    pumps: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   hold: float) -> None:
        try:
            first = await reader.read(65536)
            await asyncio.sleep(hold)
            while first:
                writer.write(first)
                await writer.drain()
                first = await reader.read(65536)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        for task in (asyncio.create_task(pump(reader, up_writer, 0.0)),
                     asyncio.create_task(pump(up_reader, writer, delay))):
            pumps.add(task)
            task.add_done_callback(pumps.discard)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(pumps):
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


@pytest.mark.timeout(30)
async def test_an_etcd_slow_to_answer_a_new_connection_is_still_reached(etcd: Etcd) -> None:
    """A connection attempt may take its time (TCP, TLS, HTTP/2's SETTINGS): the
    first call through an etcd whose answers start 0.5 s late succeeds. (gRPC
    bounds an attempt by the channel's minimum reconnect backoff, which was
    100 ms: a busy etcd made a starting coordinator exit "cannot reach etcd".)"""
    async with _slow_to_answer(etcd.endpoint, 0.5) as slow:
        client = client_for(slow)
        try:
            await client.put(b"/slow-handshake/k", b"v")
            assert (await client.get(b"/slow-handshake/k")).value == b"v"
        finally:
            await client.close()
