"""Which node a call goes to: the primary of the key's group in the cluster map.

The coordinator assigns every slot to a replica group and writes the map to
etcd; the client follows it (``common.clustermap.MapFollower``) and sends each
call to its group's primary. Where the map names no primary (no map yet, a
failover in progress) or there is no map at all (a fixed list of addresses),
any known node will do: it forwards the call, or answers NO_MAP /
GROUP_UNAVAILABLE, which the retry loop absorbs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from clients.errors import NoNodesError
from common.clustermap import RoutingTable
from common.slots import slot_for


@dataclass(frozen=True, slots=True)
class Target:
    """Where one call goes."""

    address: str
    node_id: str
    group_id: int = 0
    """The group whose primary this is; 0 when the map gave no owner (any node)."""
    epoch: int = 0
    """The map epoch the choice was made from (0: no map)."""

    @property
    def owner(self) -> bool:
        """True when the map named this node as the slot's primary."""
        return self.group_id != 0


class Router:
    """slot -> target for one service, from one map (or none) and the known nodes.

    Immutable apart from the round-robin turn: the mesh builds a new router
    when the map or the membership changes.
    """

    def __init__(self, table: RoutingTable | None, nodes: Iterable[tuple[str, str]]) -> None:
        """``nodes``: ``(node_id, address)`` of the nodes to use when the map names no owner."""
        self.table = table
        self.fallback = [Target(address, node_id) for node_id, address in nodes]
        self._turn = itertools.count()

    def for_key(self, key: str | bytes) -> Target:
        try:
            slot = slot_for(key)
        except (AttributeError, TypeError):  # None, an int: not a key at all
            raise TypeError(f"a key, lock, stream, queue or channel name is a str, "
                            f"not {type(key).__name__}") from None
        return self.for_slot(slot)

    def for_slot(self, slot: int) -> Target:
        table = self.table
        if table is not None:
            group = table.group_of_slot(slot)
            if group is not None:
                address = table.primary_address(group)
                if address:
                    return Target(address, group.primary, group.group_id, table.epoch)
        return self.any_node()

    def any_node(self) -> Target:
        """The next known node, round-robin; raises NoNodesError when none is known."""
        if not self.fallback:
            raise NoNodesError("no known node offers this service")
        target = self.fallback[next(self._turn) % len(self.fallback)]
        if self.table is not None:
            return Target(target.address, target.node_id, 0, self.table.epoch)
        return target
