"""``meshctl``: the dev launcher and the manual commands, as a person uses them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.localmesh import Etcd, LocalMesh
from tests.conftest import start_cluster

MESHCTL = [sys.executable, "-m", "meshctl"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


class Up:
    """A running ``meshctl up`` and what it printed."""

    def __init__(self, tmp: Path, nodes: int) -> None:
        self.log = tmp / "up.log"
        # Its data directory and state file go under the test's own directory: a
        # launcher that is SIGKILLed (one test does it) cannot remove them itself.
        self.env = {**os.environ, "TMPDIR": str(tmp)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*MESHCTL, "up", "--nodes", str(nodes), "--etcd-port", "0",
                 "--lease-ttl", "2", "--cluster", "uptest"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            )
        deadline = time.monotonic() + 60
        while "Ctrl-C stops the mesh." not in self.text():
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.1)
        self.etcd = re.search(r"^etcd\s+(\S+)", self.text(), re.M).group(1)  # type: ignore[union-attr]
        self.pids = [int(p) for p in re.findall(r"pid (\d+)", self.text())]
        self.addresses = re.findall(r"^node-\d+\s+(\S+)", self.text(), re.M)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MESHCTL, "--etcd", self.etcd, "--cluster", "uptest", *args],
            capture_output=True, text=True, timeout=30, env=self.env,
        )


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    running = Up(tmp_path, nodes=3)
    try:
        yield running
    finally:
        running.proc.kill()
        running.proc.wait()
        _wait_gone(running.pids, 10)


def test_up_runs_a_working_mesh_and_ctrl_c_leaves_nothing(up: Up) -> None:
    # etcd + coordinator + 3 nodes + the HTTP gateway
    assert len(up.addresses) == 3 and len(up.pids) == 6
    gateway = re.search(r"^gateway\s+(\S+)", up.text(), re.M)
    assert gateway is not None
    with urllib.request.urlopen(f"{gateway.group(1)}/healthz", timeout=10) as reply:
        assert json.loads(reply.read()) == {"status": "ok"}

    assert up.ctl("cache", "set", "greeting", "hello", "--ttl", "60").returncode == 0
    got = up.ctl("cache", "get", "greeting")
    assert got.returncode == 0 and got.stdout == "hello\n"
    assert up.ctl("cache", "get", "nothing-here").stdout == "(nil)\n"
    conflict = up.ctl("cache", "set", "greeting", "again", "--if-absent")
    assert conflict.returncode == 1 and "KeyExistsError" in conflict.stderr  # the cluster said no
    assert up.ctl("cache", "del", "greeting").stdout == "deleted\n"
    recover = up.ctl("recover", "--dry-run")
    assert recover.returncode == 0 and recover.stdout == "no group is lost\n", recover.stderr
    unused = up.ctl("lock", "describe", "jobs")
    assert unused.returncode == 0, unused.stderr
    assert unused.stdout.startswith("lock 'jobs': 0 of 1 permits held")

    status = up.ctl("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("SERVING") == 3
    for address in up.addresses:
        assert address in status.stdout
    # Figures read from each node's /metrics: KEYS, LEASES, RPCS are all numbers.
    assert len(re.findall(r"SERVING\s+\d+\s+\d+\s+\d+", status.stdout)) == 3, status.stdout
    assert len(re.findall(r"metrics http://\S+/metrics", up.text())) == 4  # coord + 3 nodes

    up.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert up.proc.wait(30) == 0, up.text()
    assert "no process left behind" in up.text()
    assert _wait_gone(up.pids, 5) == []


def test_killed_launcher_takes_its_children_with_it(up: Up) -> None:
    up.proc.kill()  # SIGKILL: no chance to clean up by itself
    up.proc.wait()
    assert _wait_gone(up.pids) == [], "children must die with the launcher"


def test_bad_input_on_the_command_line(up: Up) -> None:
    result = up.ctl("cache", "set", "", "v")
    assert result.returncode == 2
    assert "InvalidArgumentError" in result.stderr and "key" in result.stderr


def test_meshctl_status_with_no_nodes(etcd: Etcd) -> None:
    result = subprocess.run(
        [*MESHCTL, "--etcd", etcd.endpoint, "--cluster", "empty-cluster", "status"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1 and "no nodes registered" in result.stdout


def test_node_flags_and_env(etcd: Etcd, tmp_path: Path) -> None:
    """Configuration by MESH_* variables works like the flags."""
    local = LocalMesh(workdir=tmp_path, cluster="envtest", _owns_workdir=False)
    local.etcd_endpoint = etcd.endpoint
    os.environ["MESH_CACHE_EVICTION"] = "lfu"
    try:
        start_cluster(local, 1)
    finally:
        del os.environ["MESH_CACHE_EVICTION"]
    try:
        result = subprocess.run(
            [*MESHCTL, "--etcd", etcd.endpoint, "--cluster", "envtest", "status"],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0 and "SERVING" in result.stdout
        bad = subprocess.run([sys.executable, "-m", "nodes", "--services", "cache,teleport"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "teleport" in bad.stderr
    finally:
        local.stop()
