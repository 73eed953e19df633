"""The cache as a replicated state machine: one store per group, changes as commands.

One write path, as for every service: on the primary, a cache operation decides
(`CacheStore`: its clock, LRU/LFU order and the node's memory budget pick the
expiry, victims and versions; a failed condition raises before anything changed)
and proposes each resulting `Change` as one command (``cpb.KeyChange``) with
`Group.propose`; `CacheMachine.apply` applies it through `Holdings.apply`, at once
on the primary and later on every replica, the same code with the same outcome,
and returns the applied entry, the operation's result. The primary publishes each
change to the Watch feed once proposed, in order. The cache is in-memory: apply
returns nothing to persist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from common.clock import SYSTEM_CLOCK, Clock, from_seconds, to_seconds
from common.errors import Reason, ServiceError
from common.slots import slot_for
from mesh.cache.v1 import cache_replication_pb2 as cpb
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.cache.budget import Budget
from nodes.cache.capture import Capture
from nodes.cache.model import EXPIRE_AT, VALUE, VERSION
from nodes.cache.store import CacheStore, Change, ChangeType, Entry
from nodes.replication.machine import Applied

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["CACHE", "CacheMachine"]

CACHE = rpb.SERVICE_KIND_CACHE
_PRIMARY = rpb.GROUP_ROLE_PRIMARY
SNAPSHOT_PIECE_BYTES = 128 * 1024
"""About 1,000 entries of 100 bytes: made on the primary and installed on the copy
in one step of the event loop each (installing 512 KiB took 25-80 ms here)."""

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


def _pieces(capture: Capture) -> Iterator[tuple[int, bytes]]:
    """``capture`` as snapshot pieces of about SNAPSHOT_PIECE_BYTES each (one, if empty)."""
    revision = capture.revision
    piece = cpb.SnapshotPiece(revision=revision)
    size = 0
    sent = False
    for key, entry in capture.items():
        piece.entries.append(cpb.SnapshotEntry(
            key=key, value=entry[VALUE], version=entry[VERSION],
            expire_at=_seconds(entry[EXPIRE_AT])))
        size += len(key) + len(entry[VALUE]) + 32
        if size >= SNAPSHOT_PIECE_BYTES:
            yield 0, piece.SerializeToString()
            sent = True
            piece = cpb.SnapshotPiece(revision=revision)
            size = 0
    if piece.entries or not sent:
        yield 0, piece.SerializeToString()


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


def not_leading(group_id: int) -> ServiceError:
    return ServiceError(
        f"group {group_id} is no longer led by this node; retry at its new primary",
        Reason.GROUP_UNAVAILABLE, {"group_id": str(group_id)})


class CacheMachine:
    """One group's cache: a `CacheStore` counted in the node's budget."""

    __slots__ = ("_group", "_proposing", "_publish", "store")

    service = CACHE
    durable = False
    additive_restore = True  # each snapshot piece holds keys no other piece has

    def __init__(self, group: Group, budget: Budget, policy: str,
                 publish: Callable[[Change], None], clock: Clock = SYSTEM_CLOCK) -> None:
        self._group = group
        self._publish = publish
        # The change being proposed here, while `Group.propose` applies it.
        self._proposing: Change | None = None
        # Only the primary's store reads its clock (replicas apply decided changes).
        self.store = CacheStore(budget=budget, policy=policy, clock=clock.wall_ns,
                                propose=self._propose)

    def _propose(self, change: Change) -> Entry | None:
        """Make one change the primary's store decided: propose it to the group
        (which applies it here at once), publish it to watchers; the applied
        result. The service awaits the commit (after the operation's last change)."""
        group = self._group
        if group.role != _PRIMARY:  # `is_primary`, without a call on the write path
            raise not_leading(group.group_id)
        self._proposing = change
        try:
            entry: Entry | None = group.propose(slot_for(change.key), CACHE, encode(change)).result
        finally:
            self._proposing = None
        self._publish(change)
        return entry

    def apply(self, command: rpb.Command) -> Applied:
        # Our own proposal comes back as the very change it encodes: no need to
        # decode it. A replica decodes the same change; both apply it alike.
        change = self._proposing
        if change is None:
            return Applied(self.store.mirror(decode(command.payload)))
        return Applied(self.store.apply(change))  # the operation delivers to listeners

    def snapshot(self) -> Iterator[tuple[int, bytes]]:
        # Captured now (its keys listed), read and serialized a piece at a time as
        # the stream asks: a million keys never hold the event loop in one step.
        return _pieces(self.store.capture())

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> tuple[()]:
        revision = 0
        items: list[tuple[str, Entry]] = []
        for _, data in chunks:
            piece = cpb.SnapshotPiece.FromString(data)
            revision = piece.revision
            items.extend((e.key, (e.value, e.version, _instant(e.expire_at)))
                         for e in piece.entries)
        self.store.load(revision, items)
        return ()  # in memory: nothing to persist

    def role_changed(self) -> None:
        """Nothing to do: the service asks the group before every change."""

    def close(self) -> None:
        self.store.release()
