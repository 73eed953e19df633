"""The bank example's balances projection in its own process, for the acceptance
tests: ``python -m tests.projection_worker DB``.

Runs the projection into the sqlite file DB until killed, printing RUNNING once
it has started. The cluster comes from MESH_ETCD_ENDPOINTS and MESH_CLUSTER.
"""

from __future__ import annotations

import asyncio
import sys

from clients import Mesh
from clients.examples.bank import balances_projection
from clients.projection import SqliteCheckpointStore


async def main(db: str) -> None:
    async with Mesh() as mesh:
        runner = balances_projection(mesh, SqliteCheckpointStore(db))
        task = asyncio.create_task(runner.run())
        print("RUNNING", flush=True)
        await task


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
