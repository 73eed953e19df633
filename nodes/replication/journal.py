"""A node's durable store: one sqlite3 database, written by every group at once.

Durable services (the event store, the scheduler) keep their state in memory
and describe each change as SQL statements queued here with the seq of the
command that caused it. A single flusher commits everything queued in one
transaction (``synchronous=FULL`` in WAL mode: one fsync), so concurrent writes
of all groups share each fsync (group commit), then tells each group how far it
is durable. Primaries count a write as committed, and replicas acknowledge it,
only from then on.

Each flush also records, per group, the position its rows reflect
(``mesh_groups``), so that a restarted node knows which copy of which group's
history it holds (see `Replication.load_durable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["DurableCopy", "Journal", "JournalLike"]

log = logging.getLogger(__name__)

Params = Sequence[Any]

GROUPS_TABLE = """
CREATE TABLE IF NOT EXISTS mesh_groups (
    group_id INTEGER PRIMARY KEY,
    origin_epoch INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL
)"""


class JournalLike(Protocol):
    """What a durable service's machine needs of the `Journal` (tests pass fakes)."""

    def write(self, group: Group, seq: int, epoch: int, sql: str, *rows: Params) -> None: ...

    def clear(self, group: Group, tables: Iterable[str]) -> None: ...

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True, slots=True)
class DurableCopy:
    """What the disk holds of one group: its history and how far it got."""

    group_id: int
    origin_epoch: int
    epoch: int
    seq: int


@dataclass(slots=True)
class _Write:
    group: Group
    ticket: int
    seq: int
    epoch: int
    sql: str
    rows: list[Params]


class Journal:
    """Group-committed writes to ``DATA_DIR/durable.sqlite3``."""

    def __init__(self, path: Path, on_fatal: Callable[[BaseException], None] | None = None
                 ) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used by one flush (or start-up read) at a time: the
        # flusher runs its transactions in a worker thread, one after the other.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(GROUPS_TABLE)
        self._tables: list[str] = []
        self._pending: list[_Write] = []
        self._tickets = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_fatal = on_fatal
        self._closing = False
        self.flushes = 0  # for metrics: transactions committed
        self.flushed_writes = 0

    # -- set-up (start-up only: synchronous) -----------------------------------

    def create_tables(self, schema: str, tables: Iterable[str]) -> None:
        """Run a service's ``CREATE ... IF NOT EXISTS`` script. Each table named in
        ``tables`` has a ``group_id`` column: `drop_group` empties it."""
        self._db.executescript(schema)
        self._tables.extend(tables)

    def copies(self) -> list[DurableCopy]:
        """The groups this node holds a durable copy of."""
        rows = self._db.execute(
            "SELECT group_id, origin_epoch, epoch, seq FROM mesh_groups ORDER BY group_id")
        return [DurableCopy(*row) for row in rows]

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Read rows at start-up, before the node serves (synchronous)."""
        return self._db.execute(sql, params).fetchall()

    # -- writing ---------------------------------------------------------------

    def write(self, group: Group, seq: int, epoch: int, sql: str, *rows: Params) -> None:
        """Queue ``sql`` (run once per row of parameters) for ``group``'s command
        ``(epoch, seq)``; the group is durable past it after the next flush."""
        self._tickets += 1
        write = _Write(group, self._tickets, seq, epoch, sql, list(rows) or [()])
        self._pending.append(write)
        group.note_unflushed(write.ticket, seq)
        self._wakeup.set()

    def clear(self, group: Group, tables: Iterable[str]) -> None:
        """Queue the removal of ``group``'s rows from ``tables``, at its current
        position (a service replacing its state by a snapshot's)."""
        for table in tables:
            self.write(group, group.log.last_seq, group.log.last_epoch,
                       f"DELETE FROM {table} WHERE group_id = ?", (group.group_id,))

    def drop_group(self, group: Group) -> None:
        """Queue the removal of everything stored for ``group`` (it left this node)."""
        self.clear(group, self._tables)
        self.write(group, group.log.last_seq, group.log.last_epoch,
                   "DELETE FROM mesh_groups WHERE group_id = ?", (group.group_id,))
        group.dropped = True

    # -- flushing ----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    async def close(self) -> None:
        """Flush what is queued, then stop. (The flusher is asked to finish rather
        than cancelled: a transaction already in its thread must end first.)"""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        else:
            await self._flush()
        self._db.close()

    async def _run(self) -> None:
        while not (self._closing and not self._pending):
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._flush()
            except Exception as exc:  # a disk that fails writes: stop the node
                log.critical("cannot write %s: %s", self.path, exc)
                if self._on_fatal is not None:
                    self._on_fatal(exc)
                raise

    async def _flush(self) -> None:
        writes, self._pending = self._pending, []
        if not writes:
            return
        # The position each group's rows reflect after this transaction. A group
        # that was dropped has no position row any more.
        positions: dict[int, tuple[int, int, int]] = {}
        for w in writes:
            if w.group.dropped:
                positions.pop(w.group.group_id, None)
            else:
                positions[w.group.group_id] = (w.group.origin_epoch, w.epoch, w.seq)
        await asyncio.to_thread(self._commit, writes, positions)
        self.flushes += 1
        self.flushed_writes += len(writes)
        last: dict[int, tuple[Group, int]] = {}
        for w in writes:
            last[id(w.group)] = (w.group, w.ticket)
        for group, ticket in last.values():
            group.mark_flushed(ticket)

    def _commit(self, writes: list[_Write], positions: dict[int, tuple[int, int, int]]
                ) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            for w in writes:
                if len(w.rows) == 1:
                    db.execute(w.sql, w.rows[0])
                else:
                    db.executemany(w.sql, w.rows)
            db.executemany(
                "INSERT INTO mesh_groups (group_id, origin_epoch, epoch, seq) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (group_id) DO UPDATE SET "
                "origin_epoch = excluded.origin_epoch, epoch = excluded.epoch, "
                "seq = excluded.seq",
                [(gid, *pos) for gid, pos in positions.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
