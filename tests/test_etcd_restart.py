"""The mesh survives etcd restarting under it, with no manual step and nothing lost."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from clients import Mesh
from common import localmesh
from common.clustermap import wait_settled
from common.localmesh import Etcd, LocalMesh
from tests.cluster import Writer, wait_converged
from tests.conftest import start_cluster


async def test_mesh_recovers_when_etcd_restarts(tmp_path: Path) -> None:
    etcd = Etcd(tmp_path)
    etcd.start()
    local = LocalMesh(workdir=tmp_path, cluster="restart", lease_ttl=2, _owns_workdir=False)
    local.etcd_endpoint = etcd.endpoint
    try:
        start_cluster(local, 3)
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
    except BaseException:
        print(f"\n===== process logs =====\n{local.logs()}")
        raise
    finally:
        local.stop()
        etcd.stop()


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

