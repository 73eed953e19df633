"""Starting and stopping local etcd, coordinator and node processes.

Used by ``meshctl up``, the test fixtures and the benchmark, so all three run
the mesh the same way. Children are tied to their parent with
``PR_SET_PDEATHSIG``: if the parent dies, even by SIGKILL, the kernel kills
them too, so no run leaves orphan processes behind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.grpc_engine import environment as grpc_environment
from common.package import PREFIX
from common.peer import generate_secret


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (state T in ``/proc``)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                # "pid (comm) state ...": comm may hold spaces and parentheses.
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue  # the thread ended
        if state not in ("T", "t"):
            return False
    return True


def _with_parent_death(argv: list[str]) -> list[str]:
    """``argv`` run so that the child gets SIGKILL if this process dies.

    setpriv (util-linux) sets PR_SET_PDEATHSIG and execs the command, which keeps
    it. Doing it in a ``preexec_fn`` instead would run Python code between fork
    and exec, which is unsafe in a process with threads (gRPC's): the child can
    die before it ever starts.

    The kernel ties PDEATHSIG to the *thread* that forked: start children from a
    thread that lives as long as they should (the main thread, or asyncio's
    default executor, whose threads last until the loop closes), never from a
    short-lived pool.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


BIND_ATTEMPTS = 3
"""Tries of a single etcd or a redis whose ports ``free_port`` picked (``_start_binding``)."""


def _start_binding(start: Callable[[], None], again: Callable[[], None], *, picked: bool,
                   taken: str) -> None:
    """``start()`` a server on ports ``free_port`` ``picked``; if one was taken
    meanwhile (``start`` raised a ProcessError whose log says ``taken``), ``again()``
    forgets them and it starts on new ones, up to ``BIND_ATTEMPTS`` tries."""
    for attempt in range(BIND_ATTEMPTS):
        try:
            start()
            return
        except ProcessError as exc:
            if not picked or attempt == BIND_ATTEMPTS - 1 or taken not in str(exc):
                raise
            again()


def child_environment() -> dict[str, str]:
    """The environment of a node, coordinator or gateway started here (or on a
    test's network-namespace host): this one, unbuffered output, and gRPC on the
    engine Mesh's processes run on (`common.grpc_engine`)."""
    return grpc_environment({**os.environ, "PYTHONUNBUFFERED": "1"})


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel's choice)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago. Picked with all
    their sockets open at once: one after the other, the kernel may hand out a
    port it just gave (three etcd members once got two equal peer ports)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def tool(name: str) -> str:
    """Path of a binary installed in this virtualenv (etcd, grpcurl), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; run `make setup`")
    return found


class ProcessError(RuntimeError):
    """A child process failed to start or exited unexpectedly."""


@dataclass
class Child:
    """One child process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_start: int = 0
    """Where this run's output begins in the log file."""

    def start(self) -> None:
        # A restarted child appends to the same log: only what it writes counts.
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            # Own process group: a terminal's Ctrl-C reaches only the launcher, which
            # then stops the children in order (nodes first, so they can still
            # revoke their etcd leases, then etcd).
            self.proc = subprocess.Popen(
                _with_parent_death(self.argv), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, process_group=0,
            )
        finally:
            log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP, and wait until every thread has stopped. The kernel stops a
        thread only when it next runs, so on a busy machine a process can still
        answer a request sent just after ``kill`` returned (one in ten, measured)."""
        self.signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while self.alive() and not _all_threads_stopped(self.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not stop within {timeout}s")
            time.sleep(0.005)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (see `stop`)."""
        if self.proc is not None and self.proc.poll() is None:
            # A SIGSTOPped child would ignore SIGTERM until continued.
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """Wait until the child's log has a line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(self.log_path, "rb") as log:
                    log.seek(self.log_start)
                    text = log.read().decode(errors="replace")
                for line in text.splitlines():
                    if line.startswith(prefix):
                        return line
            except FileNotFoundError:
                pass
            if not self.alive():
                raise ProcessError(f"{self.name} exited early:\n{self.log_tail()}")
            time.sleep(0.05)
        raise ProcessError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")


@dataclass
class Etcd:
    """A single-member etcd for development and tests, data in a temp dir; or, with
    ``initial_cluster``, one member of an `EtcdCluster`."""

    workdir: Path
    client_port: int = 0
    child: Child | None = None
    name: str = "mesh-dev"
    peer_port: int = 0
    initial_cluster: str = ""
    """``name=peer-url,...`` of every member (empty: this one alone)."""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, timeout: float = 20.0) -> None:
        # Ports picked here were free a moment ago, not reserved: another process
        # (a parallel test's node binding port 0) can take one before etcd binds
        # it. Then pick again, from an empty data dir, rather than fail every test
        # that shares this etcd.
        def start() -> None:
            self.launch()
            self.wait_ready(timeout)

        def again() -> None:
            self.client_port = self.peer_port = 0
            shutil.rmtree(self._data_dir(), ignore_errors=True)

        _start_binding(start, again, picked=not self.client_port and not self.peer_port,
                       taken="address already in use")

    def _data_dir(self) -> Path:
        suffix = "" if self.name == "mesh-dev" else f"-{self.name}"
        return self.workdir / f"etcd-data{suffix}"

    def launch(self) -> None:
        """Start the process (its data dir is kept: a restarted member rejoins)."""
        if not self.client_port or not self.peer_port:
            client, peer = free_ports(2)
            self.client_port = self.client_port or client
            self.peer_port = self.peer_port or peer
        suffix = "" if self.name == "mesh-dev" else f"-{self.name}"
        data = self._data_dir()
        argv = [
            tool("etcd"), "--name", self.name, "--data-dir", str(data),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            # Short raft timers: 1 s leases work, so failover takes seconds.
            "--heartbeat-interval", "50", "--election-timeout", "250",
            "--log-level", "warn",
        ]
        self.child = Child(f"etcd{suffix}", argv, self.workdir / f"etcd{suffix}.log")
        self.child.start()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the member says it is healthy (for a cluster member: it has a
        raft leader, so a quorum of members must be up)."""
        assert self.child is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise ProcessError(f"{self.child.name} exited early:\n{self.child.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.client_port), timeout=0.2
            ):
                if _etcd_healthy(self.endpoint):
                    return
            time.sleep(0.05)
        raise ProcessError(
            f"{self.child.name} not ready after {timeout}s:\n{self.child.log_tail()}")

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def kill(self) -> None:
        """SIGKILL, as a crashed machine: no goodbye to clients or peers."""
        if self.child is not None:
            self.child.kill()


@dataclass
class EtcdCluster:
    """``size`` etcd members on free loopback ports forming one raft cluster, for trying
    (and testing) a member's loss: each member can be stopped, killed and restarted
    on its own; with a quorum up, etcd goes on."""

    workdir: Path
    size: int = 3
    members: list[Etcd] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def endpoint(self) -> str:
        """Every member's endpoint, comma-separated (what ``--etcd`` takes)."""
        return ",".join(self.endpoints)

    @property
    def child(self) -> Child | None:
        """The first member's process (for code written for one `Etcd`)."""
        return self.members[0].child if self.members else None

    def start(self, timeout: float = 30.0) -> None:
        # As for one etcd (`Etcd.start`): a port picked here may be taken before
        # its member binds it; then every member starts again on new ports (they
        # must all know each other's), from empty data dirs.
        def start() -> None:
            ports = free_ports(2 * self.size)
            self.members = [Etcd(self.workdir, name=f"member{i + 1}", client_port=ports[2 * i],
                                 peer_port=ports[2 * i + 1]) for i in range(self.size)]
            initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for member in self.members:
                member.initial_cluster = initial
            try:
                # All at once: a member is healthy only once a quorum has met.
                for member in self.members:
                    member.launch()
                for member in self.members:
                    member.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise

        def again() -> None:
            for member in self.members:
                shutil.rmtree(member._data_dir(), ignore_errors=True)

        _start_binding(start, again, picked=True, taken="address already in use")

    def index_of(self, endpoint: str) -> int:
        """Which member serves ``endpoint`` (host:port, as a client reports it)."""
        return self.endpoints.index(endpoint.removeprefix("http://"))

    def leader(self) -> int | None:
        """Index of the member that is the raft leader now (None: no live member knows)."""
        ids: dict[str, int] = {}
        leader = ""
        for i, member in enumerate(self.members):
            if not member.alive():
                continue
            status = _etcd_status(member.endpoint)
            if status is None:
                continue
            ids[str(status.get("header", {}).get("member_id", ""))] = i
            leader = str(status.get("leader", "")) or leader
        return ids.get(leader)

    def move_leader(self, index: int, timeout: float = 5.0) -> None:
        """Make member ``index`` the raft leader (etcd's MoveLeader, asked of the leader)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader == index:
                return
            target = _etcd_status(self.members[index].endpoint)
            if leader is not None and target is not None:
                member_id = str(target.get("header", {}).get("member_id", ""))
                _etcd_post(self.members[leader].endpoint, "/v3/maintenance/transfer-leadership",
                           {"targetID": member_id})
            time.sleep(0.05)
        raise ProcessError(f"could not make {self.members[index].name} the etcd leader")

    def restart(self, index: int, timeout: float = 20.0) -> None:
        """Start a stopped or killed member again; it rejoins from its data dir."""
        member = self.members[index]
        member.launch()
        member.wait_ready(timeout)

    def stop(self) -> None:
        """Stop the followers (together), then the leader: a leader stopping first, or
        with its followers, tries to hand leadership over and waits seconds for it."""
        leader = self.leader() if self.members else None
        last = [self.members[leader]] if leader is not None else []
        for group in ([m for m in self.members if m not in last], last):
            for member in group:
                if member.child is not None:
                    member.child.terminate()
            for member in group:
                member.stop()


@dataclass
class RedisServer:
    """Debian's redis-server on a free port, nothing persisted (benchmarks, the
    global rate limiter's tests)."""

    workdir: Path
    port: int = 0
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found: install Debian's redis-server "
                                    "(`make setup` does)")
        # As for `Etcd.start`: a port ``free_port`` picked may be taken before
        # redis binds it; then pick again.
        def start() -> None:
            self.port = self.port or free_port()
            argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir)]
            self.child = child = Child("redis-server", argv, self.workdir / "redis.log")
            child.start()
            self._wait_ready(child, timeout)

        def again() -> None:
            if self.child is not None:
                self.child.stop()
            self.port = 0

        _start_binding(start, again, picked=not self.port, taken="Address already in use")

    def _wait_ready(self, child: Child, timeout: float) -> None:
        """Until redis answers PING on our port (a PONG: not some other process that
        took the port) while our child is alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise ProcessError(f"redis-server exited early:\n{child.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.2) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG") and child.alive():
                    return
            time.sleep(0.05)
        raise ProcessError(f"redis-server not ready after {timeout}s:\n{child.log_tail()}")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def _etcd_healthy(endpoint: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=0.5) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except (OSError, http.client.HTTPException, ValueError):
        # Not up yet, or not etcd at all: another process (a gRPC server) took the
        # port and answered in its own protocol.
        return False


def _etcd_status(endpoint: str) -> dict[str, Any] | None:
    """The member's Maintenance.Status (its id, the leader's id); None if it does not
    answer."""
    return _etcd_post(endpoint, "/v3/maintenance/status", {})


def _etcd_post(endpoint: str, path: str, body: dict[str, Any],
               timeout: float = 1.0) -> dict[str, Any] | None:
    """One call through etcd's JSON gateway (no gRPC client needed in a sync caller);
    None if it fails."""
    import urllib.request

    request = urllib.request.Request(f"http://{endpoint}{path}",
                                     data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            reply = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return reply if isinstance(reply, dict) else None


@dataclass
class NodeProcess:
    """One ``python -m nodes`` child."""

    node_id: str
    child: Child
    address: str = ""
    peer_address: str = ""
    """host:port of its peer port (internal services)."""
    metrics: str = ""
    """host:port of its /metrics endpoint."""

    @property
    def pid(self) -> int:
        return self.child.pid


@dataclass
class CoordinatorProcess:
    """One ``python -m coordinator`` child."""

    coordinator_id: str
    child: Child
    address: str = ""
    metrics: str = ""
    """host:port of its /metrics endpoint."""

    @property
    def pid(self) -> int:
        return self.child.pid


@dataclass
class GatewayProcess:
    """One ``python -m gateway`` child (the HTTP/JSON gateway)."""

    name: str
    child: Child
    address: str = ""
    url: str = ""
    """``http://host:port``."""

    @property
    def pid(self) -> int:
        return self.child.pid


@dataclass
class LocalMesh:
    """etcd plus coordinators and N nodes on free ports, all children of this process."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mesh-")))
    cluster: str = "mesh"
    etcd: Etcd | EtcdCluster | None = None
    etcd_endpoint: str = ""
    """Comma-separated etcd endpoints, given to every process as ``--etcd``."""
    nodes: list[NodeProcess] = field(default_factory=list)
    lease_ttl: int = 5
    _owns_workdir: bool = True
    coordinators: list[CoordinatorProcess] = field(default_factory=list)
    gateways: list[GatewayProcess] = field(default_factory=list)
    secure_peers: bool = True
    """Give every process a cluster secret (made on first use) that guards the
    internal plane; False leaves it open, as a node without the flag does."""

    @property
    def secret_file(self) -> Path | None:
        """The cluster secret every process here is given (made on first use)."""
        if not self.secure_peers:
            return None
        path = self.workdir / "cluster-secret"
        if not path.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(generate_secret() + "\n")
        return path

    def _secret_flags(self) -> list[str]:
        secret = self.secret_file
        return ["--cluster-secret-file", str(secret)] if secret is not None else []

    def start_etcd(self, port: int = 0, members: int = 1) -> str:
        """Start etcd (with ``members`` > 1: an `EtcdCluster`, ``port`` unused);
        returns its endpoints, comma-separated."""
        self.etcd = EtcdCluster(self.workdir, members) if members > 1 else Etcd(
            self.workdir, client_port=port)
        self.etcd.start()
        self.etcd_endpoint = self.etcd.endpoint
        return self.etcd_endpoint

    def start_node(
        self, node_id: str | None = None, extra: Sequence[str] = (), timeout: float = 30.0
    ) -> NodeProcess:
        """Start ``python -m nodes`` and wait for its READY line."""
        node = self._launch_node(node_id, extra)
        self._await_ready(node, timeout)
        return node

    def start_nodes(self, count: int, extra: Sequence[str] = (), timeout: float = 30.0
                    ) -> list[NodeProcess]:
        """Start ``count`` nodes at once (their start-ups overlap), then wait for each."""
        nodes = [self._launch_node(None, extra) for _ in range(count)]
        for node in nodes:
            self._await_ready(node, timeout)
        return nodes

    def _launch_node(self, node_id: str | None, extra: Sequence[str]) -> NodeProcess:
        node_id = node_id or f"node-{len(self.nodes) + 1}"
        argv = [
            sys.executable, "-m", f"{PREFIX}nodes", "--listen", "127.0.0.1:0",
            "--etcd", self.etcd_endpoint, "--cluster", self.cluster, "--node-id", node_id,
            "--lease-ttl", str(self.lease_ttl),
            "--data-dir", str(self.workdir / node_id), *self._secret_flags(), *extra,
        ]
        env = child_environment()
        child = Child(node_id, argv, self.workdir / f"{node_id}.log", env=env)
        child.start()
        node = NodeProcess(node_id, child)
        self.nodes.append(node)
        return node

    @staticmethod
    def _await_ready(node: NodeProcess, timeout: float) -> None:
        ready = json.loads(node.child.wait_for_line("READY ", timeout).removeprefix("READY "))
        node.address, node.metrics = ready["address"], ready.get("metrics", "")
        node.peer_address = ready.get("peer_address", "")

    def start_coordinator(
        self, extra: Sequence[str] = (), coordinator_id: str | None = None,
        timeout: float = 30.0,
    ) -> CoordinatorProcess:
        """Start ``python -m coordinator`` and wait for its READY line.

        ``extra`` flags come last, so they override the defaults set here
        (e.g. ``["--lease-ttl", "1", "--min-nodes", "3", "--replicas", "2"]``).
        """
        coordinator_id = coordinator_id or f"coord-{len(self.coordinators) + 1}"
        argv = [
            sys.executable, "-m", f"{PREFIX}coordinator", "--listen", "127.0.0.1:0",
            "--etcd", self.etcd_endpoint, "--cluster", self.cluster,
            "--coordinator-id", coordinator_id, "--lease-ttl", str(self.lease_ttl),
            *self._secret_flags(), *extra,
        ]
        env = child_environment()
        child = Child(coordinator_id, argv, self.workdir / f"{coordinator_id}.log", env=env)
        child.start()
        coordinator = CoordinatorProcess(coordinator_id, child)
        self.coordinators.append(coordinator)
        ready = json.loads(child.wait_for_line("READY ", timeout).removeprefix("READY "))
        coordinator.address, coordinator.metrics = ready["address"], ready.get("metrics", "")
        return coordinator

    def start_gateway(self, extra: Sequence[str] = (), timeout: float = 30.0) -> GatewayProcess:
        """Start ``python -m gateway`` on a free port and wait for its READY line.
        ``extra`` flags come last (e.g. ``["--rate-limit-ip", "5"]``)."""
        name = f"gateway-{len(self.gateways) + 1}"
        argv = [sys.executable, "-m", f"{PREFIX}gateway", "--listen", "127.0.0.1:0",
                "--etcd", self.etcd_endpoint, "--cluster", self.cluster, *extra]
        env = child_environment()
        child = Child(name, argv, self.workdir / f"{name}.log", env=env)
        child.start()
        gateway = GatewayProcess(name, child)
        self.gateways.append(gateway)
        ready = json.loads(child.wait_for_line("READY ", timeout).removeprefix("READY "))
        gateway.address, gateway.url = ready["address"], ready["url"]
        return gateway

    def stop(self) -> None:
        """Stop the gateways, the coordinators (so nodes leaving cause no failovers),
        every node, then etcd; remove the temp dir if we made it."""
        for group in ([g.child for g in self.gateways], [c.child for c in self.coordinators],
                      [n.child for n in self.nodes]):
            # All at once: each shuts down on its own, and their grace periods overlap.
            for child in group:
                child.terminate()
            for child in group:
                child.stop()
        if self.etcd is not None:
            self.etcd.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL every coordinator and node at once, then stop etcd and remove the
        temp dir if we made it: a test's teardown, where graceful shutdown (drain
        delay, grace periods) would only be waited out. `stop` is the clean way."""
        children = [g.child for g in self.gateways] + [c.child for c in self.coordinators] + [
            n.child for n in self.nodes]
        for child in children:
            if child.alive():
                assert child.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
        for child in children:
            child.kill()  # reaps it
        if self.etcd is not None:
            self.etcd.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self, lines: int = 40) -> str:
        """The last ``lines`` of each process's log (etcd's last 10)."""
        parts = []
        for coordinator in self.coordinators:
            parts.append(f"--- {coordinator.coordinator_id} ---\n"
                         f"{coordinator.child.log_tail(lines)}")
        for node in self.nodes:
            parts.append(f"--- {node.node_id} ---\n{node.child.log_tail(lines)}")
        for gateway in self.gateways:
            parts.append(f"--- {gateway.name} ---\n{gateway.child.log_tail(lines)}")
        if self.etcd is not None and self.etcd.child is not None:
            parts.append(f"--- etcd ---\n{self.etcd.child.log_tail(10)}")
        return "\n".join(parts)
