"""How nodes describe themselves in etcd, and where.

Layout under the cluster prefix (the cluster name)::

    /<cluster>/nodes/<node_id>   -> NodeInfo as JSON, attached to the node's lease
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


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
        )
