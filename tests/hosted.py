"""A whole mesh with every process on its own host (see `tests.hosts`).

Three etcd members, two coordinators and three nodes, each in its own network
namespace, started with exactly the flags the README's "Running on several
machines" gives per host (`etcd_argv`, `coordinator_argv`, `node_argv`).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common.localmesh import Child, ProcessError, child_environment, tool
from common.peer import generate_secret
from tests.hosts import Host, Network

CLIENT_PORT = 7000
PEER_PORT = 7001
ADMIN_PORT = 7400
METRICS_PORT = 9100
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


def etcd_argv(host: Host, members: list[Host], data_dir: Path) -> list[str]:
    """One member of a 3-member etcd cluster (short raft timers for quick tests)."""
    initial = ",".join(f"{m.name}=http://{m.address}:{ETCD_PEER_PORT}" for m in members)
    return [tool("etcd"), "--name", host.name, "--data-dir", str(data_dir),
            "--listen-client-urls", f"http://{host.address}:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls", f"http://{host.address}:{ETCD_CLIENT_PORT}",
            "--listen-peer-urls", f"http://{host.address}:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://{host.address}:{ETCD_PEER_PORT}",
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "250", "--log-level", "warn"]


def coordinator_argv(host: Host, etcd: str, cluster: str, secret: Path,
                     lease_ttl: int) -> list[str]:
    return [sys.executable, "-m", "coordinator", "--listen", f"0.0.0.0:{ADMIN_PORT}",
            "--advertise", host.address, "--metrics-listen", f"0.0.0.0:{METRICS_PORT}",
            "--etcd", etcd, "--cluster", cluster, "--coordinator-id", host.name,
            "--cluster-secret-file", str(secret), "--lease-ttl", str(lease_ttl),
            "--replicas", "1", "--min-nodes", "3"]


def node_argv(host: Host, etcd: str, cluster: str, secret: Path, data_dir: Path,
              lease_ttl: int) -> list[str]:
    return [sys.executable, "-m", "nodes", "--listen", f"0.0.0.0:{CLIENT_PORT}",
            "--peer-listen", f"0.0.0.0:{PEER_PORT}", "--metrics-listen",
            f"0.0.0.0:{METRICS_PORT}", "--advertise", host.address, "--etcd", etcd,
            "--cluster", cluster, "--node-id", host.name, "--data-dir", str(data_dir),
            "--cluster-secret-file", str(secret), "--lease-ttl", str(lease_ttl),
            "--drain-delay", "0", "--shutdown-grace", "2"]


@dataclass
class HostedMesh:
    """etcd members, coordinators and nodes, one per host."""

    network: Network
    workdir: Path
    cluster: str = "hosted"
    lease_ttl: int = 2
    children: dict[str, Child] = field(default_factory=dict)
    etcd_hosts: list[Host] = field(default_factory=list)

    @property
    def etcd(self) -> str:
        """Every member's client URL, comma-separated (what every process is given)."""
        return ",".join(f"{h.address}:{ETCD_CLIENT_PORT}" for h in self.etcd_hosts)

    @property
    def secret_file(self) -> Path:
        return self.secret

    @property
    def secret(self) -> Path:
        path = self.workdir / "cluster-secret"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(generate_secret() + "\n")
        return path

    def start(self, coordinators: int = 2, nodes: int = 3) -> None:
        self.etcd_hosts = [self.network.add(f"e{i}") for i in range(1, 4)]
        for host in self.etcd_hosts:
            self._launch(host, etcd_argv(host, self.etcd_hosts,
                                         self.workdir / f"{host.name}-data"))
        for host in self.etcd_hosts:
            self._wait_etcd(host)
        for i in range(1, coordinators + 1):
            host = self.network.add(f"c{i}")
            self._launch(host, coordinator_argv(host, self.etcd, self.cluster, self.secret,
                                                self.lease_ttl))
            self.children[host.name].wait_for_line("READY ", 30)
        node_hosts = [self.network.add(f"n{i}") for i in range(1, nodes + 1)]
        for host in node_hosts:
            self.start_node(host.name, wait=False)
        for host in node_hosts:
            self.children[host.name].wait_for_line("READY ", 30)

    def start_node(self, name: str, wait: bool = True) -> Child:
        """(Re)start node ``name`` on its host, with its data dir."""
        host = self.network.hosts[name]
        child = self._launch(host, node_argv(host, self.etcd, self.cluster, self.secret,
                                             self.workdir / f"{name}-data", self.lease_ttl))
        if wait:
            child.wait_for_line("READY ", 30)
        return child

    def ready(self, name: str) -> dict[str, str]:
        line = self.children[name].wait_for_line("READY ", 30)
        ready: dict[str, str] = json.loads(line.removeprefix("READY "))
        return ready

    def _launch(self, host: Host, argv: list[str]) -> Child:
        child = Child(host.name, host.argv(argv), self.workdir / f"{host.name}.log",
                      env=child_environment())
        child.start()
        self.children[host.name] = child
        return child

    def _wait_etcd(self, host: Host, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{host.address}:{ETCD_CLIENT_PORT}/health"
        while time.monotonic() < deadline:
            child = self.children[host.name]
            if not child.alive():
                raise ProcessError(f"etcd {host.name} exited:\n{child.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=0.5) as reply:
                    if json.loads(reply.read()).get("health") == "true":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise ProcessError(f"etcd {host.name} not healthy after {timeout} s")

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{child.log_tail(30)}"
                         for name, child in self.children.items())

    def stop(self) -> None:
        """Every process (nodes and coordinators first, etcd last)."""
        order = sorted(self.children.items(), key=lambda kv: kv[0].startswith("e"))
        for _, child in order:
            child.terminate()
        for _, child in order:
            child.stop(timeout=10)
