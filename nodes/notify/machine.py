"""One group's channels, inboxes and presence as a replicated state machine
(every copy alike).

Applying a command appends an entry (numbering it, naming a new log's epoch
after the command), trims a log, moves an inbox's read cursor or changes a
channel's presence, from the state and the command alone, and returns the rows
that put the change on disk (`Storage`): the state is held in memory on every
copy of the group and mirrored into the node's journal, like the event
store's, so it survives failovers and restarts of every node. Only ephemeral
channels are neither replicated nor written: they live on the primary alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.clock import SYSTEM_CLOCK, Clock
from common.slots import slot_for
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_replication_pb2 as npb
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.due_schedule import DueSchedule
from nodes.notify.model import (
    CHANNEL,
    CREATED_NS,
    DATA,
    IDEMPOTENCY_ID,
    INBOX,
    OFFSET,
    PRESENCE,
    Entry,
    Log,
    LogKey,
    entry_record,
)
from nodes.notify.presence import Member, PresenceTable
from nodes.notify.storage import Storage
from nodes.replication.journal import JournalReader
from nodes.replication.machine import NOTHING, Applied, Persist

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["NOTIFY", "Appended", "NotifyMachine", "epoch_of"]

NOTIFY = rpb.SERVICE_KIND_NOTIFY
CHUNK_BYTES = 1 << 20
"""Snapshot chunks are cut at about this size (a long log spans several)."""
PRESENCE_EVENTS_KEPT = 100
PRESENCE_EVENTS_TTL_NS = 60 * 1_000_000_000
"""A channel's presence log keeps this many joins and leaves, this long (they
are delivered live; the short history only bridges a subscriber's catch-up)."""


@dataclass(frozen=True, slots=True)
class Appended:
    """Where an append went; ``seq`` is the command to wait for."""

    offset: int
    epoch: str
    seq: int
    duplicate: bool = False


def epoch_of(command: rpb.Command) -> str:
    """The epoch of a log created by ``command``: unique in the group's history,
    since (group epoch, seq) never repeats, even after the group was lost."""
    return f"{command.epoch:x}.{command.seq:x}"


def trim_due(log: Log, lifetime_ns: int) -> int | None:
    """When retention by age may first act on ``log``: its oldest entry's ttl
    runs out, or (empty) a channel's lifetime since its last append; None for
    an empty inbox, which is never forgotten."""
    if log.entries:
        return log.entries[0][CREATED_NS] + log.ttl_ns
    if log.kind != INBOX:
        return log.last_append_ns + lifetime_ns
    return None


class TrimSchedule(DueSchedule[LogKey]):
    """Logs by when retention by age may first act on them (`trim_due`), so a
    trim pass costs what is due, not every log held. Walking every log each
    pass cost in proportion to all of them, inboxes (never forgotten) included:
    55 ms a second for 100,000."""

    def __init__(self, lifetime_ns: int, logs: Iterable[Log] = ()) -> None:
        super().__init__()
        self.lifetime_ns = lifetime_ns
        for log in logs:
            self.put(log)

    def put(self, log: Log) -> None:
        """Put ``log`` in at its due time, if it has one."""
        due = trim_due(log, self.lifetime_ns)
        if due is not None:
            self.add(log.key, due)


class NotifyMachine:
    """The channels, inboxes and presence of one group on this node."""

    service = NOTIFY
    durable = True
    additive_restore = False

    def __init__(self, group: Group, journal: JournalReader,
                 on_leave: Callable[[int], None] | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._group = group
        self._on_leave = on_leave
        self._clock = clock  # a new primary renews presence from its own now
        self._storage = Storage(group.group_id)
        self.logs: dict[LogKey, Log] = {}
        self.ephemeral: dict[str, Log] = {}
        """Ephemeral channels' histories: on the primary only, never replicated
        (not part of the state machine's state; dropped when the role goes)."""
        self.presence = PresenceTable()
        self.leading = False
        self.created = 0
        """Channels ever created here (pattern subscriptions rescan when it grows)."""
        self._trims: TrimSchedule | None = None
        """The replicated logs' trim schedule: the primary's, built by its first
        trim pass; a copy that is not primary has none."""
        self._ephemeral_trims: TrimSchedule | None = None
        if group.restored:  # read back from disk at start-up
            logs, members = self._storage.load(journal)
            self.logs = {log.key: log for log in logs}
            for channel, member in members:
                self.presence.channels.setdefault(channel, {})[member.client_id] = member

    def find(self, key: LogKey) -> Log | None:
        """The log of ``key``: a replicated one, or an ephemeral channel's."""
        kind, name = key
        if kind == CHANNEL and self.ephemeral:
            found = self.ephemeral.get(name)
            if found is not None:
                return found
        return self.logs.get(key)

    @property
    def group(self) -> Group:
        return self._group

    def apply(self, command: rpb.Command) -> Applied:
        change = npb.NotifyCommand.FromString(command.payload)
        kind = change.WhichOneof("change")
        storage = self._storage
        if kind == "append":
            a = change.append
            writes: list[Persist] = []
            appended = self._append(int(a.kind), a.name, a.data, a.idempotency_id,
                                    a.settings if a.HasField("settings") else None,
                                    command, writes)
            return Applied(appended, writes)
        if kind == "trim":
            t = change.trim
            log = self.logs.get((t.kind, t.name))
            if log is None:
                return NOTHING
            if t.forget:
                del self.logs[log.key]
                return Applied(None, storage.forgotten(log))
            log.trim_before(t.before_offset)
            return Applied(None, [storage.trimmed(log, t.before_offset)])
        if kind == "mark_read":
            m = change.mark_read
            log = self.logs.get((INBOX, m.name))
            if log is None:
                return Applied(0)
            log.read_cursor = max(log.read_cursor, min(m.cursor, log.last_offset))
            log.changed_seq = command.seq
            return Applied(log.read_cursor, [storage.log_changed(log)])
        if kind == "join":
            j = change.join
            member, new = self.presence.join(j, command.issued_at.ToNanoseconds(), command.seq)
            writes = [storage.member_changed(j.channel, member)]
            if new:
                self._presence_event(j.channel, pb.PRESENCE_CHANGE_JOIN, member, False,
                                     command, writes)
            return Applied(member, writes)
        if kind == "leave":
            gone = change.leave
            expired_at = command.issued_at.ToNanoseconds() if gone.expired else None
            left = self.presence.leave(gone.channel, gone.client_ids, expired_at, command.seq)
            writes = [storage.members_left(gone.channel, left)] if left else []
            for member in left:
                self._presence_event(gone.channel, pb.PRESENCE_CHANGE_LEAVE, member,
                                     gone.expired, command, writes)
            return Applied(len(left), writes)
        if kind == "renewed":
            self.presence.renew(change.renewed.at_ns)
            return Applied(None, [storage.renewed(change.renewed.at_ns)])
        return NOTHING

    def _append(self, kind: int, name: str, data: bytes, idempotency_id: str,
                settings: npb.LogSettings | None, command: rpb.Command,
                writes: list[Persist]) -> Appended:
        """Append to log ``(kind, name)`` (created if new, its settings replaced if
        given); the rows go to ``writes``."""
        log = self.logs.get((kind, name))
        # When retention by age may act sooner than it was due: a new log, an
        # empty one, a shorter ttl (a later due is found when the early one comes).
        sooner = log is None or not log.entries
        if log is None:
            if settings is None:  # the primary always sends a new log's settings
                settings = npb.LogSettings(size=1, ttl_ns=0)
            log = self.logs[(kind, name)] = Log(kind, name, slot_for(name), epoch_of(command),
                                                settings.size, settings.ttl_ns)
            self.created += 1
        elif settings is not None:
            sooner = sooner or settings.ttl_ns < log.ttl_ns
            log.size, log.ttl_ns = settings.size, settings.ttl_ns
            log.changed_seq = command.seq
        earliest = log.earliest
        entry = log.append(data, idempotency_id, command.issued_at.ToNanoseconds(),
                           command.seq)
        writes.extend(self._storage.appended(log, entry, earliest))
        if sooner and self._trims is not None:
            self._trims.put(log)
        return Appended(entry[OFFSET], log.epoch, command.seq)

    # -- retention by age (the primary's) -------------------------------------------

    def trim_schedule(self, lifetime_ns: int) -> TrimSchedule:
        """The replicated logs' `TrimSchedule` (built on first use; a new primary
        builds it again from its state)."""
        trims = self._trims
        if trims is None or trims.lifetime_ns != lifetime_ns:
            trims = self._trims = TrimSchedule(lifetime_ns, self.logs.values())
        return trims

    def ephemeral_schedule(self, lifetime_ns: int) -> TrimSchedule:
        """The ephemeral channels' `TrimSchedule`, as `trim_schedule`."""
        trims = self._ephemeral_trims
        if trims is None or trims.lifetime_ns != lifetime_ns:
            trims = self._ephemeral_trims = TrimSchedule(lifetime_ns, self.ephemeral.values())
        return trims

    def ephemeral_sooner(self, log: Log) -> None:
        """Ephemeral channel ``log`` is new, got an entry while empty or a shorter
        ttl: retention may act on it sooner than scheduled."""
        if self._ephemeral_trims is not None:
            self._ephemeral_trims.put(log)

    def _presence_event(self, channel: str, change: pb.PresenceChange.ValueType,
                        member: Member, expired: bool, command: rpb.Command,
                        writes: list[Persist]) -> None:
        """Append a join or leave to the channel's presence log (a short history
        that subscribers asking for presence events follow)."""
        event = pb.PresenceEvent(change=change, member=member.to_proto(), expired=expired)
        self._append(PRESENCE, channel, event.SerializeToString(), "",
                     npb.LogSettings(size=PRESENCE_EVENTS_KEPT, ttl_ns=PRESENCE_EVENTS_TTL_NS)
                     if (PRESENCE, channel) not in self.logs else None, command, writes)

    def snapshot(self) -> list[tuple[int, bytes]]:
        """Per slot, its logs with their entries, cut in ~1 MiB chunks."""
        by_slot: dict[int, list[Log]] = {}
        for log in self.logs.values():
            by_slot.setdefault(log.slot, []).append(log)
        present: dict[int, list[str]] = {}
        for channel in self.presence.channels:
            present.setdefault(slot_for(channel), []).append(channel)
        chunks: list[tuple[int, bytes]] = []
        for slot in sorted(by_slot.keys() | present.keys()):
            logs = by_slot.get(slot, [])
            chunk = npb.NotifySnapshotChunk(presence=self.presence.records(present.get(slot, ())))
            size = chunk.ByteSize()
            for log in logs:
                record = chunk.logs.add()
                record.CopyFrom(log.record())
                size += len(log.name) + 64
                for entry in log.entries:
                    record.entries.append(entry_record(entry))
                    size += len(entry[DATA]) + len(entry[IDEMPOTENCY_ID]) + 32
                    if size >= CHUNK_BYTES:
                        chunks.append((slot, chunk.SerializeToString()))
                        chunk, size = npb.NotifySnapshotChunk(), 0
                        # The log goes on in the next chunk (fields repeated).
                        record = chunk.logs.add()
                        record.CopyFrom(log.record())
            if size:
                chunks.append((slot, chunk.SerializeToString()))
        return chunks

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> list[Persist]:
        self._trims = None
        self.logs.clear()
        self.presence.clear()
        self.created += 1
        for slot, data in chunks:
            chunk = npb.NotifySnapshotChunk.FromString(data)
            for presence in chunk.presence:
                self.presence.load(presence)
            for record in chunk.logs:
                key = (int(record.kind), record.name)
                log = self.logs.get(key)
                if log is None:
                    log = self.logs[key] = Log(
                        int(record.kind), record.name, slot, record.epoch,
                        record.settings.size, record.settings.ttl_ns, record.last_offset,
                        record.read_cursor, record.last_append_ns)
                for r in record.entries:
                    entry: Entry = (r.offset, r.data, r.idempotency_id, r.created_ns, 0)
                    log.entries.append(entry)
                    if r.idempotency_id:
                        log.ids[r.idempotency_id] = entry
        return self._storage.replace(self.logs.values(), self.presence)

    def role_changed(self) -> None:
        group = self._group
        self._trims = self._ephemeral_trims = None  # a new primary builds them again
        self.presence.forget_schedule()
        if group.writable and not self.leading:
            self.leading = True
            if self.presence.channels:
                # One command gives every member a full ttl from now (slot 0: it is
                # about the whole group), so the replicas hold the new expiries too.
                group.propose(0, NOTIFY, npb.NotifyCommand(renewed=npb.PresenceRenewed(
                    at_ns=self._clock.wall_ns())).SerializeToString())
        elif not group.writable:
            self.leading = False
            self.ephemeral.clear()
            if self._on_leave is not None:
                self._on_leave(group.group_id)

    def close(self) -> None:
        """The group leaves (or is rebuilt): end its subscriptions, forget the state.
        Its rows stay on disk: whether they go is the replication layer's call."""
        if self._on_leave is not None:
            self._on_leave(self._group.group_id)
        self._trims = self._ephemeral_trims = None
        self.logs.clear()
        self.presence.clear()
        self.ephemeral.clear()
