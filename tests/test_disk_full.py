"""A node whose disk fills up: it stops, says why, exits 1, and loses nothing.

The node's data dir is a 12 MB tmpfs mounted for the test (root, as CI runs).
Durable appends fill it; the journal's next flush fails. The node must not
acknowledge what it could not write, must not limp on, and must say plainly
what happened (not a secondary SQLite error). Given room again, the restarted
node serves every event it acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients import MeshError, NewEvent
from tests.conftest import settle

pytestmark = pytest.mark.timeout(120)

EVENT = b"x" * 4000
STREAMS = 8


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MB tmpfs, unmounted after the test whatever happened."""
    if os.geteuid() != 0:
        raise RuntimeError("mounting a small tmpfs needs root (CI and the test machines are)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_stops_the_node_and_loses_no_acknowledged_event(
    local_mesh: Any, mesh_client: Any, small_disk: Path
) -> None:
    data_dir = ["--data-dir", str(small_disk / "node")]
    local = local_mesh(1, extra=data_dir, replicas=0)
    [node] = local.nodes
    mesh = await mesh_client(timeout=3)

    acked: list[str] = []
    failed: MeshError | None = None
    for i in range(10_000):  # 12 MB holds about 2,000 of them
        event_id = f"full-{i}"
        try:
            await mesh.events.append(f"full-{i % STREAMS}", NewEvent("Filled", EVENT, id=event_id))
        except MeshError as exc:
            failed = exc
            break
        acked.append(event_id)
    assert failed is not None and len(acked) > 500, (len(acked), failed)

    returncode = await asyncio.to_thread(node.child.proc.wait, 30)
    log = node.child.log_path.read_text(errors="replace")
    assert returncode == 1, log[-3000:]
    assert "cannot write" in log and "database or disk is full" in log, log[-3000:]

    await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,size=64m", str(small_disk)],
                            check=True)
    await asyncio.to_thread(local.start_node, node.node_id, data_dir)
    await asyncio.to_thread(settle, local, 0)
    found: set[str] = set()
    for stream in range(STREAMS):
        found.update([e.id async for e in mesh.events.read_stream(f"full-{stream}")])
    assert not set(acked) - found
    await mesh.events.append("full-0", NewEvent("Filled", b"room again", id="after"))
