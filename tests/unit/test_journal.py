"""The journal and a group's durability: nothing counts before it is on disk."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pytest

from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication.group import Group
from nodes.replication.journal import DurableCopy, Journal, JournalError
from nodes.replication.machine import Applied, Clear, Persist, Write

KIND = rpb.SERVICE_KIND_EVENTS
SCHEMA = "CREATE TABLE IF NOT EXISTS notes (group_id INTEGER, seq INTEGER, body BLOB);"


class Notes:
    """A durable machine: every command's payload is a row."""

    service = KIND
    durable = True
    additive_restore = False

    def __init__(self, group: Group, journal: Journal) -> None:
        self.group = group
        self.journal = journal
        self.rows: list[bytes] = []
        if group.restored:
            self.rows = [r[0] for r in journal.query(
                "SELECT body FROM notes WHERE group_id = ? ORDER BY seq", (group.group_id,))]

    def apply(self, command: rpb.Command) -> Applied:
        self.rows.append(command.payload)
        return Applied(None, [Write("INSERT INTO notes VALUES (?, ?, ?)",
                                    [(self.group.group_id, command.seq, command.payload)])])

    def snapshot(self) -> list[tuple[int, bytes]]:
        return [(0, b"\n".join(self.rows))]

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> list[Persist]:
        for _, data in chunks:
            self.rows = data.split(b"\n") if data else []
        return [Clear(("notes",)), Write("INSERT INTO notes VALUES (?, ?, ?)",
                                         [(self.group.group_id, i, row)
                                          for i, row in enumerate(self.rows)])]

    def role_changed(self) -> None:
        pass

    def close(self) -> None:
        pass


def journal_at(path: Path) -> Journal:
    journal = Journal(path / "durable.sqlite3")
    journal.create_tables(SCHEMA, ["notes"])
    return journal


def group_on(journal: Journal, durable: DurableCopy | None = None) -> Group:
    group = Group(3, "a", {KIND: lambda g: Notes(g, journal)}, durable=durable, journal=journal)
    journal.on_flushed = lambda ticket, _groups: group.mark_flushed(ticket)
    return group


async def test_a_write_commits_only_once_flushed(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    group = group_on(journal)
    group.become_primary(4)
    seq = group.propose(17, KIND, b"one").seq
    assert group.commit_seq < seq  # queued, not yet on disk
    journal.start()
    await asyncio.wait_for(group.wait_committed(seq), 5)
    assert journal.copies() == [DurableCopy(3, 0, 4, seq)]
    await journal.close()


async def test_concurrent_writes_share_a_flush(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    group = group_on(journal)
    group.become_primary(1)
    seqs = [group.propose(1, KIND, f"w{i}".encode()).seq for i in range(50)]
    journal.start()
    await asyncio.gather(*(group.wait_committed(s) for s in seqs))
    assert journal.flushes == 1 and journal.flushed_writes == 50
    await journal.close()


async def test_a_restarted_copy_is_read_back_and_asks_for_a_snapshot(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.start()
    group = group_on(journal)
    group.become_primary(2)
    for body in (b"a", b"b", b"c"):
        await group.wait_committed(group.propose(1, KIND, body).seq)
    await journal.close()

    journal = journal_at(tmp_path)  # the node restarts
    [copy] = journal.copies()
    restored = group_on(journal, copy)
    assert restored.restored and restored.applied == (2, 3)
    notes = restored.machines[KIND]
    assert isinstance(notes, Notes) and notes.rows == [b"a", b"b", b"c"]
    ack = restored.apply_batch(rpb.CommandBatch(group_id=3, epoch=5, prev_epoch=2, prev_seq=3))
    assert ack.status == rpb.ACK_STATUS_NEEDS_SNAPSHOT
    journal.start()
    restored.install(5, 9, [(KIND, 0, b"x\ny")])
    assert not restored.restored and restored.durable_seq < 9
    await asyncio.wait_for(restored.wait_durable(9), 5)
    assert journal.query("SELECT body FROM notes WHERE group_id = 3") == [(b"x",), (b"y",)]
    assert journal.copies() == [DurableCopy(3, 0, 5, 9)]
    await journal.close()


async def test_a_replica_is_durable_only_after_the_flush(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    replica = group_on(journal)
    command = rpb.Command(seq=1, slot=0, service=KIND, payload=b"r", epoch=1)
    ack = replica.apply_batch(rpb.CommandBatch(group_id=3, epoch=1, commands=[command]))
    assert ack.status == rpb.ACK_STATUS_OK and ack.applied_seq == 1
    assert replica.durable_seq == 0
    waiting = asyncio.ensure_future(replica.wait_durable(1))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    journal.start()
    await asyncio.wait_for(waiting, 5)
    assert replica.durable_seq == 1
    await journal.close()


async def test_dropping_a_group_removes_its_rows_and_position(tmp_path: Path) -> None:
    journal = journal_at(tmp_path)
    journal.start()
    group = group_on(journal)
    group.become_primary(1)
    await group.wait_committed(group.propose(1, KIND, b"gone").seq)
    journal.drop_group(group.group_id, group.log.last_epoch, group.log.last_seq)
    await journal.close()  # flushes what is queued
    journal = journal_at(tmp_path)
    assert journal.copies() == []
    assert journal.query("SELECT count(*) FROM notes") == [(0,)]


def test_a_damaged_file_is_a_journal_error_and_a_bad_query_is_not(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.sqlite3"
    damaged.write_bytes(b"no sqlite here " * 1000)
    with pytest.raises(JournalError, match=r"file is not a database.*move it aside"):
        Journal(damaged)
    journal = Journal(tmp_path / "fine.sqlite3")
    with pytest.raises(sqlite3.OperationalError):  # a mistake in the SQL stays one
        journal.query("SELECT nothing FROM nowhere")
    assert journal.copies() == []
