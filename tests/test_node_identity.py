"""A node started again with its data dir is the same node; addresses others can use.

Real node processes on the session etcd, started without ``--node-id``: the id
is generated once and kept in the data dir.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.localmesh import Child, Etcd, ProcessError
from common.membership import NodeInfo
from tests.cluster import registration


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def _node(children: list[Child], etcd: Etcd, workdir: Path, name: str, *flags: str) -> Child:
    """``python -m nodes`` with only the flags given (no --node-id), from ``workdir``."""
    argv = [sys.executable, "-m", "nodes", "--etcd", etcd.endpoint, "--cluster", "identity",
            "--services", "cache", "--drain-delay", "0", *flags]
    child = Child(name, argv, workdir / f"{name}.log")
    children.append(child)
    child.start()
    return child


def _ready(child: Child) -> dict[str, str]:
    ready: dict[str, str] = json.loads(
        child.wait_for_line("READY ", 30).removeprefix("READY "))
    return ready


def test_a_restarted_node_keeps_its_id_and_no_two_share_a_data_dir(
        children: list[Child], etcd: Etcd, tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    first = _node(children, etcd, tmp_path, "first", "--data-dir", data)
    node_id = _ready(first)["node_id"]
    # A second node on the same data dir would be a second copy of the first.
    twin = _node(children, etcd, tmp_path, "twin", "--data-dir", data)
    with pytest.raises(ProcessError, match="in use by another running node"):
        twin.wait_for_line("READY ", 30)
    assert first.stop() == 0
    again = _node(children, etcd, tmp_path, "again", "--data-dir", data)
    assert _ready(again)["node_id"] == node_id


def _registered(etcd: Etcd, node_id: str) -> NodeInfo | None:
    """What etcd holds under ``node_id``'s key now."""
    return asyncio.run(registration(etcd.endpoint, "identity", node_id))


def test_a_second_live_process_with_a_nodes_id_is_refused(
        children: list[Child], etcd: Etcd, tmp_path: Path) -> None:
    """The same --node-id on two data dirs (a copied unit file, say): the second
    process waits twice the lease ttl for the key to go, sees the first still renewing
    it, and exits 2 saying so; the first keeps its registration."""
    same = ("--node-id", "same", "--lease-ttl", "2")
    first = _node(children, etcd, tmp_path, "first", *same, "--data-dir", str(tmp_path / "a"))
    pid = int(_ready(first)["pid"])
    second = _node(children, etcd, tmp_path, "second", *same, "--data-dir", str(tmp_path / "b"))
    assert second.proc is not None and second.proc.wait(60) == 2
    output = second.log_path.read_text()
    assert "Traceback" not in output, output
    [line] = [text for text in output.splitlines() if text.startswith("error: ")]
    assert "held by another live process" in line and "--node-id" in line, line
    registered = _registered(etcd, "same")
    assert registered is not None and registered.pid == pid
    assert first.alive()


def test_every_interface_needs_an_advertised_address(
        children: list[Child], etcd: Etcd, tmp_path: Path) -> None:
    bare = _node(children, etcd, tmp_path, "bare", "--listen", "0.0.0.0:0",
                 "--data-dir", str(tmp_path / "bare"))
    with pytest.raises(ProcessError, match="--advertise"):
        bare.wait_for_line("READY ", 30)
    assert "Traceback" not in bare.log_tail()
    advertised = _node(children, etcd, tmp_path, "advertised", "--listen", "0.0.0.0:0",
                       "--peer-listen", "0.0.0.0:0", "--metrics-listen", "0.0.0.0:0",
                       "--advertise", "127.0.0.1", "--data-dir", str(tmp_path / "adv"))
    ready = _ready(advertised)
    for name in ("address", "peer_address", "metrics"):
        host, _, port = ready[name].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0, ready
    assert len({ready["address"], ready["peer_address"], ready["metrics"]}) == 3


def test_a_damaged_journal_is_named_in_one_line_and_moving_it_aside_lets_the_node_start(
        children: list[Child], etcd: Etcd, tmp_path: Path) -> None:
    data = tmp_path / "data"
    durable = ("--data-dir", str(data), "--services", "events")
    first = _node(children, etcd, tmp_path, "first", *durable)
    _ready(first)
    assert first.stop() == 0
    journal = data / "durable.sqlite3"
    journal.write_bytes(b"no sqlite here " * 1000)
    for suffix in ("-wal", "-shm"):
        journal.with_name(journal.name + suffix).unlink(missing_ok=True)

    damaged = _node(children, etcd, tmp_path, "damaged", *durable)
    assert damaged.proc is not None and damaged.proc.wait(30) == 2
    output = damaged.log_path.read_text()
    assert "Traceback" not in output, output
    [line] = [text for text in output.splitlines() if text.startswith("error: ")]
    assert str(journal) in line and "file is not a database" in line and "move it aside" in line

    journal.rename(data / "durable.sqlite3.damaged")
    again = _node(children, etcd, tmp_path, "again", *durable)
    _ready(again)
