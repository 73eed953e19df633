"""Notifications on disk: their tables in the node's journal, writes and read-back.

Memory holds the state; the disk holds a copy so that a restarted node gets its
groups back, channels, inboxes and presence alike (`NotifyMachine` loads it
when its group was read back from the journal). `Storage` describes each
change as rows (`Write`, `Clear`); the machine returns them from ``apply`` and
the group counts the command as durable only once they are on disk.
Ephemeral channels are never written: they live on the primary only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from nodes.notify.model import Entry, Log
from nodes.notify.presence import Member
from nodes.replication.journal import JournalReader
from nodes.replication.machine import Clear, Persist, Write

if TYPE_CHECKING:
    from nodes.notify.presence import PresenceTable

__all__ = ["SCHEMA", "TABLES", "Storage"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS notify_logs (
    group_id INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    name TEXT NOT NULL,
    slot INTEGER NOT NULL,
    epoch TEXT NOT NULL,
    size INTEGER NOT NULL,
    ttl_ns INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,
    read_cursor INTEGER NOT NULL,
    last_append_ns INTEGER NOT NULL,
    PRIMARY KEY (group_id, kind, name)
);
CREATE TABLE IF NOT EXISTS notify_entries (
    group_id INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    name TEXT NOT NULL,
    entry_offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    idempotency_id TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (group_id, kind, name, entry_offset)
);
CREATE TABLE IF NOT EXISTS notify_presence (
    group_id INTEGER NOT NULL,
    channel TEXT NOT NULL,
    client_id TEXT NOT NULL,
    user TEXT NOT NULL,
    info BLOB NOT NULL,
    ttl_ns INTEGER NOT NULL,
    joined_ns INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL,
    PRIMARY KEY (group_id, channel, client_id)
);
"""
TABLES = ("notify_logs", "notify_entries", "notify_presence")

_UPSERT_LOG = (
    "INSERT OR REPLACE INTO notify_logs (group_id, kind, name, slot, epoch, size, ttl_ns, "
    "last_offset, read_cursor, last_append_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_ENTRY = (
    "INSERT OR REPLACE INTO notify_entries (group_id, kind, name, entry_offset, data, "
    "idempotency_id, created_ns) VALUES (?, ?, ?, ?, ?, ?, ?)")
_REMOVE_BEFORE = ("DELETE FROM notify_entries WHERE group_id = ? AND kind = ? AND name = ? "
                  "AND entry_offset < ?")
_FORGET_LOG = "DELETE FROM notify_logs WHERE group_id = ? AND kind = ? AND name = ?"
_UPSERT_MEMBER = (
    "INSERT OR REPLACE INTO notify_presence (group_id, channel, client_id, user, info, "
    "ttl_ns, joined_ns, expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_REMOVE_MEMBER = ("DELETE FROM notify_presence WHERE group_id = ? AND channel = ? "
                  "AND client_id = ?")
_RENEW = ("UPDATE notify_presence SET expires_ns = MAX(expires_ns, ? + ttl_ns) "
          "WHERE group_id = ?")


class Storage:
    """The rows of one group's notifications, and reading them back."""

    def __init__(self, group_id: int) -> None:
        self._gid = group_id

    def appended(self, log: Log, entry: Entry, earliest_before: int) -> list[Persist]:
        """An entry was appended (and size retention may have dropped old ones)."""
        writes: list[Persist] = [Write(_INSERT_ENTRY, [self._entry_row(log, entry)]),
                                 self.log_changed(log)]
        if log.earliest > earliest_before:
            writes.append(self.trimmed(log, log.earliest))
        return writes

    def log_changed(self, log: Log) -> Write:
        return Write(_UPSERT_LOG, [self._log_row(log)])

    def trimmed(self, log: Log, before_offset: int) -> Write:
        return Write(_REMOVE_BEFORE, [(self._gid, log.kind, log.name, before_offset)])

    def forgotten(self, log: Log) -> list[Persist]:
        return [Write(_REMOVE_BEFORE, [(self._gid, log.kind, log.name, log.last_offset + 1)]),
                Write(_FORGET_LOG, [(self._gid, log.kind, log.name)])]

    def member_changed(self, channel: str, member: Member) -> Write:
        return Write(_UPSERT_MEMBER, [self._member_row(channel, member)])

    def members_left(self, channel: str, members: Iterable[Member]) -> Write:
        return Write(_REMOVE_MEMBER, [(self._gid, channel, m.client_id) for m in members])

    def renewed(self, at_ns: int) -> Write:
        return Write(_RENEW, [(at_ns, self._gid)])

    def replace(self, logs: Iterable[Log], presence: PresenceTable) -> list[Persist]:
        """What makes the disk hold exactly this state (a snapshot was installed)."""
        logs = list(logs)
        writes: list[Persist] = [Clear(TABLES)]
        if logs:
            writes.append(Write(_UPSERT_LOG, [self._log_row(log) for log in logs]))
        entries = [self._entry_row(log, e) for log in logs for e in log.entries]
        if entries:
            writes.append(Write(_INSERT_ENTRY, entries))
        members = [self._member_row(channel, m) for channel, found in presence.channels.items()
                   for m in found.values()]
        if members:
            writes.append(Write(_UPSERT_MEMBER, members))
        return writes

    def load(self, journal: JournalReader) -> tuple[list[Log], list[tuple[str, Member]]]:
        """The group's logs (with their entries) and presence, read back at start-up."""
        query, gid = journal.query, (self._gid,)
        logs = {(kind, name): Log(kind, name, slot, epoch, size, ttl_ns, last, read, appended)
                for kind, name, slot, epoch, size, ttl_ns, last, read, appended in query(
                    "SELECT kind, name, slot, epoch, size, ttl_ns, last_offset, read_cursor, "
                    "last_append_ns FROM notify_logs WHERE group_id = ?", gid)}
        for kind, name, offset, data, idempotency_id, created_ns in query(
                "SELECT kind, name, entry_offset, data, idempotency_id, created_ns FROM "
                "notify_entries WHERE group_id = ? ORDER BY kind, name, entry_offset", gid):
            log = logs.get((kind, name))
            if log is None:
                continue  # a forgotten log's rows (removed in the same flush)
            entry: Entry = (offset, bytes(data), idempotency_id, created_ns, 0)
            log.entries.append(entry)
            if idempotency_id:
                log.ids[idempotency_id] = entry
        members = [(channel, Member(client_id, user, bytes(info), ttl_ns, joined, expires))
                   for channel, client_id, user, info, ttl_ns, joined, expires in query(
                       "SELECT channel, client_id, user, info, ttl_ns, joined_ns, expires_ns "
                       "FROM notify_presence WHERE group_id = ?", gid)]
        return list(logs.values()), members

    def _log_row(self, log: Log) -> tuple[Any, ...]:
        return (self._gid, log.kind, log.name, log.slot, log.epoch, log.size, log.ttl_ns,
                log.last_offset, log.read_cursor, log.last_append_ns)

    def _entry_row(self, log: Log, e: Entry) -> tuple[Any, ...]:
        offset, data, idempotency_id, created_ns, _ = e
        return (self._gid, log.kind, log.name, offset, data, idempotency_id, created_ns)

    def _member_row(self, channel: str, m: Member) -> tuple[Any, ...]:
        return (self._gid, channel, m.client_id, m.user, m.info, m.ttl_ns, m.joined_ns,
                m.expires_ns)
