"""A node's durable store: one sqlite3 database, written by every group at once.

Durable services (the event store, the scheduler) keep their state in memory;
applying a command returns the rows that put its change on disk (`Write`,
`Clear`), and the group queues them here with the command's position. A single
flusher commits everything queued in one transaction (``synchronous=FULL`` in
WAL mode: one fsync), so concurrent writes of all groups share each fsync
(group commit), then reports the last ticket it made durable, and the groups
whose writes that flush carried (``on_flushed``). The transactions run in a
thread of the journal's own, handed each flush through a queue and answering
on the event loop: with a flush every few appends, `asyncio.to_thread`'s
executor and future chaining were a cost to see (16 appends in flight on 3
nodes, R=1: 3,070 appends/s with it, 3,340 without, alternating runs).
Primaries count a write as committed, and replicas acknowledge it, only from
then on. The journal knows groups by id only: it never calls into them.

Each flush also records, per group, the position its rows reflect
(``mesh_groups``), so that a restarted node knows which copy of which group's
history it holds (see `Replication.load_durable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.process import StartupError
from nodes.replication.machine import Clear, Persist

__all__ = ["DurableCopy", "Journal", "JournalError", "JournalReader", "JournalWriter"]

log = logging.getLogger(__name__)

Params = Sequence[Any]

GROUPS_TABLE = """
CREATE TABLE IF NOT EXISTS mesh_groups (
    group_id INTEGER PRIMARY KEY,
    origin_epoch INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL
)"""


class JournalError(StartupError):
    """The journal file cannot be opened or read at start-up (damaged, not sqlite)."""

    def __init__(self, path: Path, cause: sqlite3.Error) -> None:
        super().__init__(
            f"{path} cannot be used as this node's journal ({cause}); if it is damaged, "
            "move it aside (with its -wal and -shm files): the node then starts empty and "
            "the other nodes copy its groups back to it")


_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_IOERR)
"""What a damaged file or failing disk answers (not a mistake in the SQL)."""


def _damaged(path: Path, exc: sqlite3.DatabaseError) -> Exception:
    """``exc`` as a JournalError if the file is at fault, else as it is."""
    # Extended codes carry the primary one in their low byte (SQLITE_IOERR_FSYNC...).
    return JournalError(path, exc) if (exc.sqlite_errorcode & 0xFF) in _DAMAGED else exc


class JournalReader(Protocol):
    """What a durable machine reads at start-up (tests pass fakes)."""

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]: ...


class JournalWriter(Protocol):
    """What a group needs to make its commands durable (tests pass fakes)."""

    flushed_ticket: int
    """Every write up to this ticket is on disk."""

    def write(self, group_id: int, origin_epoch: int, epoch: int, seq: int,
              writes: Sequence[Persist]) -> int: ...


@dataclass(frozen=True, slots=True)
class DurableCopy:
    """What the disk holds of one group: its history and how far it got."""

    group_id: int
    origin_epoch: int
    epoch: int
    seq: int


@dataclass(slots=True)
class _Queued:
    group_id: int
    origin_epoch: int
    epoch: int
    seq: int
    writes: Sequence[Persist]
    drop: bool = False  # the group left this node: its position row goes too


@dataclass(frozen=True)
class _Commit:
    """A flush for the committer thread, and the future it settles."""

    done: asyncio.Future[None]
    queued: list[_Queued]
    positions: dict[int, tuple[int, int, int] | None]


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # the flusher was cancelled
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


class Journal:
    """Group-committed writes to ``DATA_DIR/durable.sqlite3``."""

    def __init__(self, path: Path, on_fatal: Callable[[BaseException], None] | None = None
                 ) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used by one flush (or start-up read) at a time: the
        # flusher runs its transactions in the committer thread, one after the other.
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(GROUPS_TABLE)
        except sqlite3.Error as exc:
            raise JournalError(path, exc) from None
        self._tables: list[str] = []
        self._pending: list[_Queued] = []
        self._tickets = 0  # the last ticket handed out; the flusher's are in order
        self.flushed_ticket = 0
        self.on_flushed: Callable[[int, Collection[int]], None] | None = None
        """Told after each flush the last durable ticket and the ids of the groups
        whose writes it carried (the node's replication): a node leads hundreds
        of groups, and only those need looking at."""
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_fatal = on_fatal
        self._closing = False
        self.flushes = 0  # for metrics: transactions committed
        self.flushed_writes = 0
        self._commits: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._committer: threading.Thread | None = None

    # -- set-up (start-up only: synchronous) -----------------------------------

    def create_tables(self, schema: str, tables: Iterable[str]) -> None:
        """Run a service's ``CREATE ... IF NOT EXISTS`` script. Each table named in
        ``tables`` has a ``group_id`` column: `drop_group` empties it."""
        try:
            self._db.executescript(schema)
        except sqlite3.DatabaseError as exc:
            raise _damaged(self.path, exc) from None
        self._tables.extend(tables)

    def copies(self) -> list[DurableCopy]:
        """The groups this node holds a durable copy of."""
        rows = self.query(
            "SELECT group_id, origin_epoch, epoch, seq FROM mesh_groups ORDER BY group_id")
        return [DurableCopy(*row) for row in rows]

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Read rows at start-up, before the node serves (synchronous)."""
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _damaged(self.path, exc) from None

    # -- writing ---------------------------------------------------------------

    def write(self, group_id: int, origin_epoch: int, epoch: int, seq: int,
              writes: Sequence[Persist]) -> int:
        """Queue ``writes`` for group ``group_id``'s command ``(epoch, seq)``;
        returns their ticket (durable once `on_flushed` reports it)."""
        return self._queue(_Queued(group_id, origin_epoch, epoch, seq, writes))

    def drop_group(self, group_id: int, epoch: int, seq: int) -> int:
        """Queue the removal of everything stored for a group (it left this node)."""
        return self._queue(_Queued(group_id, 0, epoch, seq, [Clear(tuple(self._tables))],
                                   drop=True))

    def _queue(self, queued: _Queued) -> int:
        self._tickets += 1
        self._pending.append(queued)
        self._wakeup.set()
        return self._tickets

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
        if self._committer is not None:
            self._commits.put(None)
            await asyncio.to_thread(self._committer.join)
            self._committer = None
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
        queued, self._pending = self._pending, []
        if not queued:
            return
        # The position each group's rows reflect after this transaction. A group
        # that was dropped has no position row any more.
        positions: dict[int, tuple[int, int, int] | None] = {}
        for q in queued:
            positions[q.group_id] = None if q.drop else (q.origin_epoch, q.epoch, q.seq)
        ticket = self._tickets  # the last one queued is in this flush
        await self._in_committer(queued, positions)
        self.flushes += 1
        self.flushed_writes += len(queued)
        self.flushed_ticket = ticket
        if self.on_flushed is not None:
            self.on_flushed(ticket, positions.keys())

    async def _in_committer(self, queued: list[_Queued],
                            positions: dict[int, tuple[int, int, int] | None]) -> None:
        """`_commit` in the committer thread; returns (or raises) when it has."""
        loop = asyncio.get_running_loop()
        if self._committer is None:
            self._committer = threading.Thread(target=self._commit_each, args=(loop,),
                                               name="journal", daemon=True)
            self._committer.start()
        done = loop.create_future()
        self._commits.put(_Commit(done, queued, positions))
        await done

    def _commit_each(self, loop: asyncio.AbstractEventLoop) -> None:
        """The committer thread: each queued flush in turn, until None comes."""
        while (job := self._commits.get()) is not None:
            error: BaseException | None = None
            try:
                self._commit(job.queued, job.positions)
            except BaseException as exc:  # the flusher raises it on the loop
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, job.done, error)

    def _commit(self, queued: list[_Queued],
                positions: dict[int, tuple[int, int, int] | None]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            for q in queued:
                for write in q.writes:
                    if isinstance(write, Clear):
                        for table in write.tables:
                            db.execute(f"DELETE FROM {table} WHERE group_id = ?",
                                       (q.group_id,))
                    elif len(write.rows) == 1:
                        db.execute(write.sql, write.rows[0])
                    else:
                        db.executemany(write.sql, write.rows)
            db.executemany("DELETE FROM mesh_groups WHERE group_id = ?",
                           [(gid,) for gid, pos in positions.items() if pos is None])
            db.executemany(
                "INSERT INTO mesh_groups (group_id, origin_epoch, epoch, seq) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (group_id) DO UPDATE SET "
                "origin_epoch = excluded.origin_epoch, epoch = excluded.epoch, "
                "seq = excluded.seq",
                [(gid, *pos) for gid, pos in positions.items() if pos is not None])
            db.execute("COMMIT")
        except BaseException:
            # SQLite ends the transaction itself on some errors (a full disk among
            # them): a ROLLBACK then fails too, and its error would hide the cause.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
