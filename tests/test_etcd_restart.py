"""The mesh survives etcd restarting under it, with no manual step."""

from __future__ import annotations

import asyncio
from pathlib import Path

from clients import Mesh
from meshctl.processes import Etcd, LocalMesh


async def test_nodes_and_clients_recover_when_etcd_restarts(tmp_path: Path) -> None:
    etcd = Etcd(tmp_path)
    etcd.start()
    local = LocalMesh(workdir=tmp_path, cluster="restart", lease_ttl=2, _owns_workdir=False)
    local.etcd_endpoint = etcd.endpoint
    try:
        local.start_nodes(2)
        async with Mesh(etcd=etcd.endpoint, cluster="restart") as mesh:
            await mesh.cache.mset({f"k{i}": b"v" for i in range(50)})

            etcd.stop()
            # Data lives in the nodes, not in etcd: reads keep working meanwhile.
            assert await mesh.cache.mget([f"k{i}" for i in range(50)]) == [b"v"] * 50
            await asyncio.sleep(3)  # longer than the nodes' 2 s lease
            etcd.start()  # same port, same data dir

            # The nodes keep (or re-create) their registrations, and the client's
            # membership view follows etcd again: a node joining now is seen.
            third = await asyncio.to_thread(local.start_node)
            for _ in range(100):
                if len(mesh.nodes("cache")) == 3:
                    break
                await asyncio.sleep(0.1)
            assert sorted(n.node_id for n in mesh.nodes("cache")) == [
                "node-1", "node-2", third.node_id]
            await mesh.cache.set("after", b"restart")
            assert await mesh.cache.get("after") == b"restart"
    finally:
        local.stop()
        etcd.stop()
