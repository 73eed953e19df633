"""Which node serves a key.

Until the coordinator owns a cluster map, each slot goes to the node that
scores highest for it under rendezvous (highest-random-weight) hashing: every
client computes the same answer from the same membership, and a node joining
or leaving moves only the slots it wins or held (about 1/N of them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from common.membership import NodeInfo
from common.slots import slot_for


def _score(node_id: str, slot: int) -> int:
    digest = hashlib.blake2b(f"{node_id}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class SlotRouter:
    """slot -> node, computed lazily and cached until membership changes."""

    def __init__(self) -> None:
        self._nodes: list[NodeInfo] = []
        self._by_slot: dict[int, NodeInfo] = {}

    def update(self, nodes: Iterable[NodeInfo]) -> None:
        self._nodes = sorted(nodes, key=lambda n: n.node_id)
        self._by_slot = {}

    def __bool__(self) -> bool:
        return bool(self._nodes)

    def node_for_slot(self, slot: int) -> NodeInfo | None:
        node = self._by_slot.get(slot)
        if node is None and self._nodes:
            node = max(self._nodes, key=lambda n: _score(n.node_id, slot))
            self._by_slot[slot] = node
        return node

    def node_for_key(self, key: str) -> NodeInfo | None:
        return self.node_for_slot(slot_for(key))
