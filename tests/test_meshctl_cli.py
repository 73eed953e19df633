"""``meshctl`` as an operator (or a script) uses it: exit codes, one-line errors,
``--output json``, ``topology --watch``, ``drain`` progress, ``node start``,
``health`` and JSON logs, against real etcd, coordinator and node processes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.localmesh import Etcd, LocalMesh, free_port
from tests.conftest import module_cluster
from tests.test_meshctl import _wait_gone

MESHCTL = [sys.executable, "-m", "meshctl"]
ADMIN = "cli-admin"


def _clean_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed command (and no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _ctl(etcd: str, cluster: str, *args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHCTL, "--etcd", etcd, "--cluster", cluster, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _run_all(commands: list[list[str]], timeout: float = 30
             ) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands at once (most of their time is waiting on a
    timeout) and return their results in order."""
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda argv: subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout), commands))


class Up:
    """A ``meshctl up`` of 3 nodes under a cluster name of its own (``node start``
    finds an up by its cluster name)."""

    def __init__(self, tmp: Path) -> None:
        self.cluster = f"cli{os.getpid()}"
        self.log = tmp / "up.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*MESHCTL, "up", "--nodes", "3", "--etcd-port", "0", "--lease-ttl", "2",
                 "--cluster", self.cluster, "--no-status"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "Ctrl-C stops the mesh." not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.1)
        self.etcd = re.search(r"^etcd\s+(\S+)", self.text(), re.M).group(1)  # type: ignore[union-attr]
        self.coordinator = re.search(r"^coord-1\s+(\S+)", self.text(), re.M).group(1)  # type: ignore[union-attr]
        self.addresses = re.findall(r"^node-\d+\s+(\S+)", self.text(), re.M)
        # Up and printed is not yet settled: wait for every node to say SERVING.
        while self.ctl("status", timeout=30).returncode != 0:
            assert time.monotonic() < deadline + 30, self.text()
            time.sleep(0.3)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"pid (\d+)", self.text())]

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _ctl(self.etcd, self.cluster, *args, timeout=timeout)

    def json(self, *args: str) -> Any:
        result = self.ctl("-o", "json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    running = Up(tmp_path_factory.mktemp("up"))
    try:
        yield running
    finally:
        pids = running.pids()
        running.proc.send_signal(signal.SIGINT)
        try:
            running.proc.wait(40)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait()
        assert _wait_gone(pids, 15) == [], "every process of the mesh must be gone"


# --- without a mesh ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_version_and_usage_errors() -> None:
    version = subprocess.run([*MESHCTL, "--version"], capture_output=True, text=True,
                             timeout=30)
    assert version.returncode == 0
    assert re.fullmatch(r"meshctl \d+\.\d+\.\d+\S*\n", version.stdout), version.stdout
    helped = subprocess.run([*MESHCTL, "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "Exit codes:" in helped.stdout
    assert "MESH_ETCD_ENDPOINTS" in helped.stdout and "default: 5.0" in helped.stdout
    usage = (["topology", "--bogus"], ["--output", "yaml", "status"], ["drain"],
             ["--etcd", "bogus", "status"], ["--etcd", "bogus:xx", "topology"],
             ["nosuchcommand"], ["--log-level", "loud", "status"])
    for args, result in zip(usage, _run_all([[*MESHCTL, *a] for a in usage]), strict=True):
        assert result.returncode == 2, (args, result.stderr)
        _clean_error(result)


@pytest.mark.timeout(60)
def test_unreachable_etcd_is_exit_3_in_one_line() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    reads = (["status"], ["topology"], ["-o", "json", "topology"], ["cache", "get", "k"],
             ["lock", "describe", "l"], ["jobs", "stats", "q"], ["drain", "node-1"])
    *results, unreachable, as_json, coordinator = _run_all([
        *([*MESHCTL, "--etcd", nobody, "--cluster", "nowhere", "--timeout", "1", *a]
          for a in reads),
        [*MESHCTL, "health", nobody],
        [*MESHCTL, "health", nobody, "-o", "json"],
        # The server processes say it the same way.
        [sys.executable, "-m", "coordinator", "--etcd", nobody, "--log-format", "json"],
    ])
    for args, result in zip(reads, results, strict=True):
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert "check --etcd" in _clean_error(result)
    assert unreachable.returncode == 3
    _clean_error(unreachable)
    assert json.loads(as_json.stdout)["status"] == "UNREACHABLE"
    assert coordinator.returncode == 3
    assert "cannot reach etcd" in _clean_error(coordinator)


@pytest.mark.timeout(60)
def test_node_start_without_an_up_says_so() -> None:
    result = subprocess.run([*MESHCTL, "--cluster", f"none{os.getpid()}", "node", "start"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and "no `meshctl up` is running" in _clean_error(result)


# --- against `meshctl up` ------------------------------------------------------------

@pytest.mark.timeout(120)
def test_exit_codes_and_json_reads(up: Up) -> None:
    assert up.ctl("cache", "set", "cli:k", "v1").returncode == 0
    conflict = up.ctl("cache", "set", "cli:k", "v2", "--if-absent")
    assert conflict.returncode == 1 and "KeyExistsError" in _clean_error(conflict)
    invalid = up.ctl("cache", "set", "", "v")
    assert invalid.returncode == 2 and "InvalidArgumentError" in _clean_error(invalid)
    unknown = up.ctl("drain", "no-such-node")
    assert unknown.returncode == 1 and "NotFoundError" in _clean_error(unknown)
    missing_job = up.ctl("jobs", "get", "no-such-job")
    assert missing_job.returncode == 1 and "JobNotFoundError" in _clean_error(missing_job)
    assert up.ctl("cache", "get", "cli:nothing").returncode == 1

    entry = up.json("cache", "get", "cli:k")
    assert entry == {"key": "cli:k", "found": True, "value": "v1", "version": 1,
                     "expire_at": None}
    status = up.json("status")
    assert status["cluster"]["leader_id"] == "coord-1" and status["coordinator_error"] is None
    assert status["cluster"]["slots_covered"] == status["cluster"]["slots_total"] == 16384
    assert sorted(n["address"] for n in status["nodes"]) == sorted(up.addresses)
    assert all(n["health"] == "SERVING" and isinstance(n["rpcs"], int)
               for n in status["nodes"])
    # The global options also work after the subcommand.
    after = up.ctl("topology", "-o", "json")
    topology = json.loads(after.stdout)
    assert topology["epoch"] >= 1 and len(topology["nodes"]) == 3
    assert {n["state"] for n in topology["nodes"]} == {"ACTIVE"}
    covered = sum(end - start + 1 for g in topology["groups"] for start, end in g["slots"])
    assert covered == 16384
    assert all(g["primary"] and g["replicas"][0]["in_sync"] for g in topology["groups"])
    lock = up.json("lock", "describe", "cli-lock")
    assert lock == {"name": "cli-lock", "holders": [], "waiters": [], "max_permits": 1,
                    "available_permits": 1, "fencing_token": 0}
    stats = up.ctl("-o", "json", "jobs", "stats", "cli-q1", "cli-q2")
    assert [json.loads(line)["queue"] for line in stats.stdout.splitlines()] \
        == ["cli-q1", "cli-q2"]
    assert json.loads(stats.stdout.splitlines()[0])["dead"] == 0
    assert up.json("jobs", "dead", "cli-q1") == {"queue": "cli-q1", "total": 0, "jobs": []}
    assert up.json("recover", "--dry-run")["group_ids"] == []
    dot = up.ctl("topology", "--format", "dot")
    assert dot.returncode == 0 and dot.stdout.startswith("digraph mesh {")
    assert '"node-1" -> "group-1"' in dot.stdout or '"node-1" -> "group-' in dot.stdout


@pytest.mark.timeout(120)
def test_health_exit_codes(up: Up, etcd: Etcd, tmp_path: Path) -> None:
    node = up.ctl("health", up.addresses[0])
    assert node.returncode == 0 and node.stdout.strip().endswith("SERVING")
    assert up.ctl("health", up.coordinator).returncode == 0
    served = up.ctl("-o", "json", "health", up.addresses[1], "--service",
                    "mesh.cache.v1.CacheService")
    assert served.returncode == 0
    assert json.loads(served.stdout)["status"] == "SERVING"
    unknown = up.ctl("health", up.addresses[0], "--service", "no.such.Service")
    assert unknown.returncode == 1 and "SERVICE_UNKNOWN" in unknown.stdout
    # A node with no coordinator has no map: it answers, NOT_SERVING.
    lone = LocalMesh(workdir=tmp_path, cluster=f"lonely{os.getpid()}", _owns_workdir=False)
    lone.etcd_endpoint = etcd.endpoint
    try:
        address = lone.start_node().address
        result = _ctl(etcd.endpoint, lone.cluster, "health", address)
        assert result.returncode == 1 and "NOT_SERVING" in result.stdout, result.stdout
    finally:
        lone.stop()


@pytest.mark.timeout(120)
def test_topology_watch_until_ctrl_c(up: Up) -> None:
    base = [*MESHCTL, "--etcd", up.etcd, "--cluster", up.cluster, "topology", "--watch"]
    for args in (["-o", "json"], ["--nodes"]):
        watch = subprocess.Popen([*base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            assert watch.stdout is not None
            first = watch.stdout.readline()
            if args[0] == "-o":
                assert json.loads(first)["epoch"] >= 1
            else:
                assert first.startswith("map epoch ")
            watch.send_signal(signal.SIGINT)
            assert watch.wait(20) == 0
            assert "Traceback" not in watch.stderr.read()  # type: ignore[union-attr]
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()


@pytest.mark.timeout(180)
def test_node_start_then_drain_with_progress(up: Up) -> None:
    # Started by `meshctl up` with the mesh's settings, plus flags of its own.
    started = up.ctl("-o", "json", "node", "start", "--", "--log-format", "json",
                     "--log-level", "debug")
    assert started.returncode == 0, started.stderr
    node = json.loads(started.stdout)
    assert node["node_id"] == "node-4" and node["pid"] in up.pids()
    deadline = time.monotonic() + 30
    while True:
        nodes = {n["node_id"]: n for n in up.json("topology")["nodes"]}
        if "node-4" in nodes and nodes["node-4"]["primary_groups"]:
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(0.3)
    assert nodes["node-4"]["address"] == node["address"]
    assert up.ctl("health", node["address"]).returncode == 0
    taken = up.ctl("node", "start", "--node-id", "node-4")
    assert taken.returncode == 1 and "already runs" in _clean_error(taken)

    # --log-format json: every Python log line of the node is one JSON object (gRPC's
    # C core may write a line of its own to stderr, which is not ours to shape).
    lines = [line for line in Path(node["log"]).read_text().splitlines()
             if line and not line.startswith("READY ")]
    assert not [line for line in lines
                if re.match(r"\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ \S+: ", line)], lines
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["level"] == "debug" for r in records)

    drained = up.ctl("-o", "json", "drain", "node-4", "--timeout", "60", timeout=90)
    assert drained.returncode == 0, drained.stderr
    events = [json.loads(line) for line in drained.stdout.splitlines()]
    assert events[0]["event"] == "planned" and events[0]["primary_slots"] > 0
    assert events[-1]["event"] == "done" and events[-1]["groups_left"] == 0
    assert all(e["event"] == "progress" and e["groups_left"] > 0 for e in events[1:-1])
    after = {n["node_id"]: n for n in up.json("topology")["nodes"]}
    assert "node-4" not in after or not (after["node-4"]["primary_groups"]
                                         or after["node-4"]["replica_groups"])


# --- a mesh with tokens --------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """A coordinator and three nodes that want a bearer token."""
    def flags(workdir: Path) -> list[str]:
        tokens = workdir / "tokens"
        tokens.write_text(f"{ADMIN} ops admin\n")
        return ["--auth-tokens", str(tokens)]

    # The stuck drain below pauses two nodes while meshctl starts and calls: a
    # lease longer than that (seconds, on a loaded machine) keeps them eligible,
    # so the drain is accepted and runs into its --timeout.
    yield from module_cluster(etcd, tmp_path_factory, "clisecured", 3, flags, coordinator=True,
                              lease_ttl=15)


def _as(local: LocalMesh, token: str, *args: str, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return _ctl(local.etcd_endpoint, local.cluster, *args, timeout=timeout,
                env={**os.environ, "MESH_TOKEN": token})


@pytest.mark.timeout(180)
def test_bad_token_stuck_drain_and_lost_stream(secured: LocalMesh) -> None:
    for args in (["topology"], ["cache", "get", "k"], ["drain", "node-1"]):
        refused = _as(secured, "forged", *args)
        assert refused.returncode == 1, (args, refused.stderr)
        assert "UnauthenticatedError" in _clean_error(refused)
        assert "MESH_TOKEN" in refused.stderr

    # A drain whose moves cannot finish (their targets are frozen) fails at --timeout.
    others = [n.child for n in secured.nodes[1:]]
    for child in others:
        child.pause()
    try:
        stuck = _as(secured, ADMIN, "drain", secured.nodes[0].node_id, "--timeout", "1.5")
    finally:
        for child in others:
            child.signal(signal.SIGCONT)
    assert stuck.returncode == 1, stuck.stdout + stuck.stderr
    assert "did not finish in 1.5s" in _clean_error(stuck)
    assert stuck.stdout.startswith(f"draining {secured.nodes[0].node_id} since map epoch")

    # The coordinator goes away under a watch: exit 3, one line.
    watch = subprocess.Popen(
        [*MESHCTL, "--etcd", secured.etcd_endpoint, "--cluster", secured.cluster,
         "-o", "json", "topology", "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "MESH_TOKEN": ADMIN})
    try:
        assert watch.stdout is not None and watch.stderr is not None
        assert json.loads(watch.stdout.readline())["epoch"] >= 1
        secured.coordinators[0].child.kill()
        # Read on while waiting: the drain's maps (1,024 groups each) fill a pipe.
        _, error = watch.communicate(timeout=30)
        assert watch.returncode == 3
        assert "Traceback" not in error and error.startswith("error: ") \
            and len(error.strip().splitlines()) == 1, error
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
