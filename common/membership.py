"""How nodes describe themselves in etcd, and where.

Layout under the cluster prefix (the cluster name)::

    /<cluster>/nodes/<node_id>   -> NodeInfo as JSON, attached to the node's lease
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import aetcd

from common.etcd import PrefixFollower

log = logging.getLogger(__name__)


def nodes_prefix(cluster: str) -> bytes:
    return f"/{cluster}/nodes/".encode()


def node_key(cluster: str, node_id: str) -> bytes:
    return nodes_prefix(cluster) + node_id.encode()


@dataclass(frozen=True)
class NodeInfo:
    """A live node, as registered in etcd."""

    node_id: str
    address: str
    services: tuple[str, ...]
    version: str
    pid: int = 0
    started_at: float = 0.0
    metrics: str = ""
    """host:port of its Prometheus /metrics endpoint ("" if it serves none)."""
    incarnation: str = ""
    """Random id of this process (new at every start)."""
    peer_address: str = ""
    """host:port of its peer port (internal services); "" means ``address``."""
    copies: tuple[int, ...] = ()
    """Groups it read back from its disk at start-up: seating it in those again
    costs a catch-up from the log instead of a full copy."""
    stalled: tuple[str, ...] = ()
    """Nodes replicating groups it leads that stopped answering it (`nodes.stalls`):
    the coordinator gives those groups other replicas."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> NodeInfo:
        data = json.loads(raw)
        return cls(
            node_id=str(data["node_id"]),
            address=str(data["address"]),
            services=tuple(data.get("services", ())),
            version=str(data.get("version", "")),
            pid=int(data.get("pid", 0)),
            started_at=float(data.get("started_at", 0.0)),
            metrics=str(data.get("metrics", "")),
            incarnation=str(data.get("incarnation", "")),
            peer_address=str(data.get("peer_address", "")),
            copies=tuple(int(g) for g in data.get("copies", ())),
            stalled=tuple(str(n) for n in data.get("stalled", ())),
        )


class Membership:
    """The live registrations under ``/<cluster>/nodes/``, kept current from etcd.

    ``nodes`` maps node_id -> NodeInfo; listeners run on every change. A
    malformed record is logged and skipped, never fatal.
    """

    def __init__(self, client: aetcd.Client, cluster: str) -> None:
        self._prefix = nodes_prefix(cluster)
        self.nodes: dict[str, NodeInfo] = {}
        self._listeners: list[Callable[[], None]] = []
        self._follower = PrefixFollower(client, self._prefix, self._on_read, self._on_event,
                                        name="membership")

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        """Read the registrations (raising if etcd is unreachable), then follow them."""
        await self._follower.start()

    async def refresh(self) -> None:
        await self._follower.refresh()

    async def close(self) -> None:
        await self._follower.close()

    def _parse(self, key: bytes, value: bytes) -> NodeInfo | None:
        try:
            return NodeInfo.from_json(value)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed node record %r: %s", key, exc)
            return None

    def _on_read(self, kvs: list[tuple[bytes, bytes, int]]) -> None:
        infos = (self._parse(key, value) for key, value, _ in kvs)
        self._replace({info.node_id: info for info in infos if info is not None})

    def _on_event(self, kind: str, key: bytes, value: bytes, _revision: int) -> None:
        nodes = dict(self.nodes)
        info = self._parse(key, value) if kind == "PUT" else None
        if info is None:
            nodes.pop(key[len(self._prefix):].decode(), None)
        else:
            nodes[info.node_id] = info
        self._replace(nodes)

    def _replace(self, nodes: dict[str, NodeInfo]) -> None:
        if nodes != self.nodes:
            self.nodes = nodes
            for listener in self._listeners:
                listener()
