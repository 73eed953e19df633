"""Who holds a node's etcd key when processes with its id crash, stop or overlap.

Real node processes on the session etcd, each given the same ``--node-id``: a
restart takes its crashed predecessor's key at once; a process that finds a
stranger's key waits for that lease to run out; a node stopped past its lease
that finds another process registered under its id when it wakes stops.
"""

from __future__ import annotations

import signal
from pathlib import Path

from common.localmesh import Child, Etcd
from tests.test_node_identity import _node, _ready, _registered, children

__all__ = ["children"]  # test_node_identity's fixture: the node processes, stopped after

_WAITING = "is registered by another process"


def test_a_restart_takes_its_crashed_predecessors_key_at_once_another_waits_it_out(
        children: list[Child], etcd: Etcd, tmp_path: Path) -> None:
    """A node SIGKILLed leaves its key until its lease runs out. Restarted on
    its data dir, it knows the key for its own and registers at once; with the
    data dir's record gone (a new disk), it waits for the lease to run out."""
    data = tmp_path / "data"
    flags = ("--node-id", "back", "--lease-ttl", "3", "--data-dir", str(data))
    first = _node(children, etcd, tmp_path, "first", *flags)
    _ready(first)
    first.kill()
    again = _node(children, etcd, tmp_path, "again", *flags)
    pid = int(_ready(again)["pid"])
    assert _WAITING not in again.log_path.read_text()
    registered = _registered(etcd, "back")
    assert registered is not None and registered.pid == pid

    again.kill()
    (data / "incarnation").unlink()
    third = _node(children, etcd, tmp_path, "third", *flags)
    pid = int(_ready(third)["pid"])
    assert _WAITING in third.log_path.read_text()
    registered = _registered(etcd, "back")
    assert registered is not None and registered.pid == pid


def test_a_node_woken_to_find_another_process_registered_as_it_stops(
        children: list[Child], etcd: Etcd, tmp_path: Path) -> None:
    """Paused past its lease (SIGSTOP: a VM frozen, a long GC), a node's key is
    gone, and a second process given its id registers. When the first wakes it
    does not take the key back: it waits out the other's lease, sees it renewed,
    and exits 1, leaving the second registered."""
    same = ("--node-id", "paused", "--lease-ttl", "2")
    first = _node(children, etcd, tmp_path, "first", *same, "--data-dir", str(tmp_path / "a"))
    _ready(first)
    first.pause()
    second = _node(children, etcd, tmp_path, "second", *same,
                   "--data-dir", str(tmp_path / "b"))
    pid = int(_ready(second)["pid"])  # the first's lease ran out meanwhile
    first.signal(signal.SIGCONT)
    assert first.proc is not None and first.proc.wait(60) == 1
    assert "held by another live process" in first.log_path.read_text()
    registered = _registered(etcd, "paused")
    assert registered is not None and registered.pid == pid
    assert second.alive()
