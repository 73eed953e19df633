"""The event store on disk: its tables in the node's journal, writes and read-back.

Memory holds the state; the disk holds a copy so that a restarted node gets
its groups back (`EventsMachine` loads it when its group was read back from
the journal). `Storage` describes each change as rows (`Write`, `Clear`); the
machine returns them from ``apply`` and the group queues them with the seq of
the command that caused them, so it counts the command as durable only once
the rows are on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mesh.events.v1 import events_replication_pb2 as epb
from nodes.events.model import SlotLog, StoredEvent, Stream
from nodes.events.store import EventStore
from nodes.replication.journal import JournalReader
from nodes.replication.machine import Clear, Persist, Write

__all__ = ["SCHEMA", "TABLES", "Storage"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS events_log (
    group_id INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    position INTEGER NOT NULL,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    data BLOB NOT NULL,
    metadata BLOB NOT NULL,
    content_type TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (group_id, slot, position)
);
CREATE INDEX IF NOT EXISTS events_log_by_stream ON events_log (group_id, stream, version);
CREATE TABLE IF NOT EXISTS events_streams (
    group_id INTEGER NOT NULL,
    stream TEXT NOT NULL,
    slot INTEGER NOT NULL,
    last_version INTEGER NOT NULL,
    max_count INTEGER NOT NULL,
    max_age_ns INTEGER NOT NULL,
    truncate_before INTEGER NOT NULL,
    metadata_version INTEGER NOT NULL,
    state INTEGER NOT NULL,
    PRIMARY KEY (group_id, stream)
);
CREATE TABLE IF NOT EXISTS events_slots (
    group_id INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    last_position INTEGER NOT NULL,
    PRIMARY KEY (group_id, slot)
);
"""
TABLES = ("events_log", "events_streams", "events_slots")

_INSERT_EVENT = (
    "INSERT OR REPLACE INTO events_log (group_id, slot, position, stream, version, event_id, "
    "type, data, metadata, content_type, created_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_UPSERT_STREAM = (
    "INSERT OR REPLACE INTO events_streams (group_id, stream, slot, last_version, max_count, "
    "max_age_ns, truncate_before, metadata_version, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_UPSERT_SLOT = (
    "INSERT OR REPLACE INTO events_slots (group_id, slot, last_position) VALUES (?, ?, ?)")
_REMOVE_BEFORE = "DELETE FROM events_log WHERE group_id = ? AND stream = ? AND version < ?"


class Storage:
    """The rows of one group's event store, and reading them back."""

    def __init__(self, group_id: int) -> None:
        self._gid = group_id

    def appended(self, stream: Stream, log: SlotLog, events: Sequence[StoredEvent]
                 ) -> list[Persist]:
        return [Write(_INSERT_EVENT, [self._event_row(e) for e in events]),
                Write(_UPSERT_STREAM, [self._stream_row(stream)]),
                Write(_UPSERT_SLOT, [(self._gid, log.slot, log.last_position)])]

    def stream_changed(self, stream: Stream) -> Write:
        return Write(_UPSERT_STREAM, [self._stream_row(stream)])

    def removed(self, stream: Stream, before_version: int) -> Write:
        return Write(_REMOVE_BEFORE, [(self._gid, stream.stream_id, before_version)])

    def replace(self, store: EventStore) -> list[Persist]:
        """What makes the disk hold exactly ``store`` (a snapshot was installed)."""
        writes: list[Persist] = [Clear(TABLES)]
        if store.slots:
            writes.append(Write(_UPSERT_SLOT, [(self._gid, log.slot, log.last_position)
                                               for log in store.slots.values()]))
        if store.streams:
            writes.append(Write(_UPSERT_STREAM,
                                [self._stream_row(s) for s in store.streams.values()]))
        rows = [self._event_row(e) for log in store.slots.values() for e in log.entries
                if store.stored(e)]
        if rows:
            writes.append(Write(_INSERT_EVENT, rows))
        return writes

    def load(self, journal: JournalReader, store: EventStore) -> None:
        """Read the group's rows back into ``store`` (start-up only: synchronous)."""
        query, gid = journal.query, (self._gid,)
        slots = query("SELECT slot, last_position FROM events_slots WHERE group_id = ?", gid)
        streams = [
            (slot, epb.StreamRecord(
                stream=stream, last_version=last, max_count=count, max_age_ns=age,
                truncate_before=truncate, metadata_version=meta, state=state))
            for stream, slot, last, count, age, truncate, meta, state in query(
                "SELECT stream, slot, last_version, max_count, max_age_ns, truncate_before, "
                "metadata_version, state FROM events_streams WHERE group_id = ?", gid)]
        events: list[StoredEvent] = [
            (stream, version, slot, position, event_id, type_, bytes(data), bytes(metadata),
             content_type, created_ns, 0)
            for slot, position, stream, version, event_id, type_, data, metadata,
            content_type, created_ns in query(
                "SELECT slot, position, stream, version, event_id, type, data, metadata, "
                "content_type, created_ns FROM events_log WHERE group_id = ? "
                "ORDER BY slot, position", gid)]
        store.load(slots, streams, events)

    def _event_row(self, e: StoredEvent) -> tuple[Any, ...]:
        stream, version, slot, position, event_id, type_, data, metadata, content_type, \
            created_ns, _ = e
        return (self._gid, slot, position, stream, version, event_id, type_, data, metadata,
                content_type, created_ns)

    def _stream_row(self, s: Stream) -> tuple[Any, ...]:
        return (self._gid, s.stream_id, s.slot, s.last_version, s.max_count, s.max_age_ns,
                s.truncate_before, s.metadata_version, s.state)
