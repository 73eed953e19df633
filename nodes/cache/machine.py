"""The cache as a replicated state machine: one store per group, changes as commands.

The cache replicates effects rather than requests: its decisions depend on the
primary's clock, its read history (LRU/LFU order) and the node's memory budget,
none of which a replica shares. So the primary's store runs each request and
every change it makes (a set, a delete, an expiry, an eviction) becomes one
command; replicas apply the changes verbatim (`CacheStore.mirror`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from common.clock import SYSTEM_CLOCK, Clock, from_seconds, to_seconds
from common.slots import slot_for
from mesh.cache.v1 import cache_replication_pb2 as cpb
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.cache.budget import Budget
from nodes.cache.store import CacheStore, Change, ChangeType, Entry

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["CACHE", "CacheMachine"]

CACHE = rpb.SERVICE_KIND_CACHE
SNAPSHOT_PIECE_BYTES = 512 * 1024

_TO_WIRE = {
    ChangeType.SET: cpb.CHANGE_KIND_SET,
    ChangeType.DELETE: cpb.CHANGE_KIND_DELETE,
    ChangeType.EXPIRE: cpb.CHANGE_KIND_EXPIRE,
    ChangeType.EVICT: cpb.CHANGE_KIND_EVICT,
}
_FROM_WIRE = {wire: kind for kind, wire in _TO_WIRE.items()}


def _seconds(expire_at: int | None) -> float:
    """An expiry as the wire has it: float seconds, 0.0 for none."""
    return 0.0 if expire_at is None else to_seconds(expire_at)


def _instant(seconds: float) -> int | None:
    return from_seconds(seconds) if seconds else None


def encode(change: Change) -> bytes:
    wire = cpb.KeyChange(
        kind=_TO_WIRE[change.type], key=change.key, value=change.value,
        revision=change.revision, expire_at=_seconds(change.expire_at))
    data: bytes = wire.SerializeToString()
    return data


def decode(payload: bytes) -> Change:
    wire = cpb.KeyChange.FromString(payload)
    return Change(_FROM_WIRE[wire.kind], wire.key, wire.value, wire.revision,
                  _instant(wire.expire_at))


class CacheMachine:
    """One group's cache: a `CacheStore` counted in the node's budget."""

    service = CACHE
    durable = False

    def __init__(self, group: Group, budget: Budget, policy: str,
                 publish: Callable[[Change], None], clock: Clock = SYSTEM_CLOCK) -> None:
        self._group = group
        self._publish = publish
        # Only the primary's store reads it (replicas mirror its changes verbatim).
        self.store = CacheStore(budget=budget, policy=policy, clock=clock.wall_ns)
        self.store.add_listener(self._changed)

    def _changed(self, change: Change) -> None:
        group = self._group
        if group.is_primary:
            # Replicas mirror changes; only the primary issues them.
            group.append(slot_for(change.key), CACHE, encode(change))
            self._publish(change)

    def apply(self, command: rpb.Command) -> None:
        self.store.mirror(decode(command.payload))

    def snapshot(self) -> list[tuple[int, bytes]]:
        revision, items = self.store.export()
        pieces: list[tuple[int, bytes]] = []
        piece = cpb.SnapshotPiece(revision=revision)
        size = 0
        for key, entry in items:
            piece.entries.append(cpb.SnapshotEntry(
                key=key, value=entry.value, version=entry.version,
                expire_at=_seconds(entry.expire_at)))
            size += len(key) + len(entry.value) + 32
            if size >= SNAPSHOT_PIECE_BYTES:
                pieces.append((0, piece.SerializeToString()))
                piece = cpb.SnapshotPiece(revision=revision)
                size = 0
        if piece.entries or not pieces:
            pieces.append((0, piece.SerializeToString()))
        return pieces

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> None:
        revision = 0
        items: list[tuple[str, Entry]] = []
        for _, data in chunks:
            piece = cpb.SnapshotPiece.FromString(data)
            revision = piece.revision
            items.extend((e.key, Entry(e.value, e.version, _instant(e.expire_at)))
                         for e in piece.entries)
        self.store.load(revision, items)

    def role_changed(self) -> None:
        """Nothing to do: the service asks the group before every change."""

    def close(self) -> None:
        self.store.release()
