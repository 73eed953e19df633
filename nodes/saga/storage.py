"""Sagas on disk: their tables in the node's journal, writes and read-back.

Memory holds the state; the disk holds a copy so that a restarted node gets its
groups' sagas back. A saga is one row holding its whole record (a few KiB:
its steps and history), rewritten at each change; a type is one row with all
its versions.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.slots import slot_for
from mesh.saga.v1 import saga_replication_pb2 as spb
from nodes.replication.journal import JournalReader
from nodes.replication.machine import Clear, Persist, Write

__all__ = ["SCHEMA", "TABLES", "Storage"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS saga_sagas (
    group_id INTEGER NOT NULL,
    saga_id TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (group_id, saga_id)
);
CREATE TABLE IF NOT EXISTS saga_types (
    group_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (group_id, name)
);
"""
TABLES = ("saga_sagas", "saga_types")

_UPSERT_SAGA = "INSERT OR REPLACE INTO saga_sagas (group_id, saga_id, record) VALUES (?, ?, ?)"
_DELETE_SAGA = "DELETE FROM saga_sagas WHERE group_id = ? AND saga_id = ?"
_UPSERT_TYPE = "INSERT OR REPLACE INTO saga_types (group_id, name, record) VALUES (?, ?, ?)"


class Storage:
    """The rows of one group's sagas and types, and reading them back."""

    def __init__(self, group_id: int) -> None:
        self._gid = group_id

    def saga(self, record: spb.SagaRecord) -> Write:
        return Write(_UPSERT_SAGA, [(self._gid, record.saga.saga_id,
                                     record.SerializeToString())])

    def forgotten(self, saga_ids: Iterable[str]) -> Write:
        return Write(_DELETE_SAGA, [(self._gid, saga_id) for saga_id in saga_ids])

    def type(self, record: spb.TypeRecord) -> Write:
        return Write(_UPSERT_TYPE, [(self._gid, record.name, record.SerializeToString())])

    def replace(self, sagas: Iterable[spb.SagaRecord],
                types: Iterable[spb.TypeRecord]) -> list[Persist]:
        """What makes the disk hold exactly this state (a snapshot was installed)."""
        writes: list[Persist] = [Clear(TABLES)]
        rows = [(self._gid, r.saga.saga_id, r.SerializeToString()) for r in sagas]
        if rows:
            writes.append(Write(_UPSERT_SAGA, rows))
        type_rows = [(self._gid, t.name, t.SerializeToString()) for t in types]
        if type_rows:
            writes.append(Write(_UPSERT_TYPE, type_rows))
        return writes

    def load(self, journal: JournalReader
             ) -> tuple[list[spb.SagaRecord], list[spb.TypeRecord]]:
        """The group's sagas and types, read back at start-up."""
        gid = (self._gid,)
        sagas = [spb.SagaRecord.FromString(bytes(blob)) for (blob,) in journal.query(
            "SELECT record FROM saga_sagas WHERE group_id = ?", gid)]
        types = [spb.TypeRecord.FromString(bytes(blob)) for (blob,) in journal.query(
            "SELECT record FROM saga_types WHERE group_id = ?", gid)]
        return sagas, types


def slot_of_saga(record: spb.SagaRecord) -> int:
    return slot_for(record.saga.saga_id)
