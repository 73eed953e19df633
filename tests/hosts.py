"""Separate hosts on one machine: Linux network namespaces on a bridge, and cuts.

Each `Host` is a network namespace with one address on a private /24 that
exists only on this bridge (nothing routes it anywhere else), reached from the
test process, which is the "client host" with an address on the bridge too.
Links are cut and healed with nftables rules inside the hosts' namespaces
(packets dropped silently, as a real partition does: no reset, no error until
a deadline), never in the machine's own namespace. Everything is removed on
`close`, pass or fail; a leftover from a killed run is removed by the next
`Network` (namespaces and bridge carry a common prefix).

Needs root and the `ip` (iproute2) and `nft` (nftables) commands; `make setup`
installs nftables. Without them a test fails with a message saying so.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["CLIENT", "Host", "Network", "NetworkUnavailable"]

PREFIX = "meshn"
"""Of every namespace, veth and bridge made here (so leftovers can be found)."""
CLIENT = "client"
"""The test process's own host, as an end of a cut."""


class NetworkUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, or a command is missing)."""


def _run(*argv: str, stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")


@dataclass
class Host:
    """One namespace: its name, its address, the commands to run inside it."""

    name: str
    namespace: str
    address: str
    veth: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class Network:
    """Hosts on one bridge; `cut`, `isolate` and `heal` change who reaches whom."""

    subnet: int = field(default_factory=lambda: random.randint(1, 254))
    """10.213.<subnet>.0/24: private, on this bridge only."""
    hosts: dict[str, Host] = field(default_factory=dict)
    _cuts: set[frozenset[str]] = field(default_factory=set)
    _bridge: str = ""
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def client_address(self) -> str:
        return f"10.213.{self.subnet}.254"

    def open(self) -> Network:
        if os.geteuid() != 0:
            raise NetworkUnavailable("multi-host tests make network namespaces: run them as "
                                     "root (CI and the test machines are)")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise NetworkUnavailable(f"`{tool}` is missing: run `make setup` (it installs "
                                         "iproute2's ip and nftables)")
        remove_leftovers()
        self._bridge = f"{PREFIX}{self.subnet}br"
        _run("ip", "link", "add", self._bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.client_address}/24", "dev", self._bridge)
        _run("ip", "link", "set", self._bridge, "up")
        return self

    def add(self, name: str) -> Host:
        """A new host ``name`` with the next address."""
        number = next(self._numbers)
        host = Host(name, f"{PREFIX}{self.subnet}-{name}", f"10.213.{self.subnet}.{number}",
                    f"{PREFIX}{self.subnet}v{number}")
        ns, inside = host.namespace, f"{host.veth}i"
        _run("ip", "netns", "add", ns)
        self.hosts[name] = host
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", ns)
        _run("ip", "link", "set", host.veth, "master", self._bridge)
        _run("ip", "link", "set", host.veth, "up")
        _run("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", inside)
        _run("ip", "-n", ns, "link", "set", inside, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        self._filter(host)
        return host

    # -- cuts --------------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """No packet between hosts ``a`` and ``b`` (either may be `CLIENT`), both ways."""
        self._cuts.add(frozenset((a, b)))
        self._refilter(a, b)

    def heal(self, a: str, b: str) -> None:
        self._cuts.discard(frozenset((a, b)))
        self._refilter(a, b)

    def isolate(self, name: str) -> None:
        """Cut ``name`` from every other host and from the client."""
        for other in [*self.hosts, CLIENT]:
            if other != name:
                self._cuts.add(frozenset((name, other)))
        self._refilter(*self.hosts)

    def heal_all(self) -> None:
        self._cuts.clear()
        self._refilter(*self.hosts)

    def _address(self, name: str) -> str:
        return self.client_address if name == CLIENT else self.hosts[name].address

    def _refilter(self, *names: str) -> None:
        for name in names:
            if name in self.hosts:
                self._filter(self.hosts[name])

    def _filter(self, host: Host) -> None:
        """Make ``host``'s nftables drop exactly its cuts (rules live only in its namespace)."""
        peers = sorted(self._address(other) for cut in self._cuts if host.name in cut
                       for other in cut if other != host.name)
        rules = "".join(f"add rule inet mesh input ip saddr {a} drop\n"
                        f"add rule inet mesh output ip daddr {a} drop\n" for a in peers)
        _run(*host.argv(["nft", "-f", "-"]), stdin=(
            "table inet mesh {}\ndelete table inet mesh\n"
            "table inet mesh {\n"
            "  chain input { type filter hook input priority 0; }\n"
            "  chain output { type filter hook output priority 0; }\n"
            "}\n" + rules))

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Remove every namespace and the bridge (their processes must be stopped)."""
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "delete", host.namespace], capture_output=True,
                           timeout=20)
            subprocess.run(["ip", "link", "delete", host.veth], capture_output=True, timeout=20)
        self.hosts.clear()
        if self._bridge:
            subprocess.run(["ip", "link", "delete", self._bridge], capture_output=True,
                           timeout=20)


def remove_leftovers() -> None:
    """Namespaces and links a killed earlier run left behind (ours only: by prefix)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=20).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=20)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           timeout=20).stdout
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) > 1 and parts[1].strip().startswith(PREFIX):
            link = parts[1].strip().split("@")[0]
            subprocess.run(["ip", "link", "delete", link], capture_output=True, timeout=20)
