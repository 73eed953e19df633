"""Projections: CQRS read models fed by an event subscription, with exactly-once effect.

    def handle(conn: sqlite3.Connection, event: RecordedEvent) -> None:
        if event.type == "MoneyDeposited":
            conn.execute("UPDATE balances SET balance = balance + ? WHERE id = ?", ...)

    store = SqliteCheckpointStore("read-model.db")
    runner = ProjectionRunner(mesh, "balances", handle, category="account-", store=store)
    await runner.run()          # until cancelled or `await runner.stop()`

The handler runs inside the same sqlite3 transaction that saves the projection's
checkpoint (the stream version, or slot -> position for a category or all
projection), so the read model and the checkpoint always agree: after a crash
or a restart the runner resumes right after the last committed event, and every
event changes the read model exactly once. Several events share a transaction
when they arrive together. All sqlite work runs in a worker thread, never on
the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from clients.event_types import (
    BEGINNING,
    CaughtUp,
    Checkpoint,
    Positions,
    RecordedEvent,
    merge_positions,
)

if TYPE_CHECKING:
    from clients.event_subscription import Subscription
    from clients.mesh import Mesh

T = TypeVar("T")

Handler = Callable[[sqlite3.Connection, RecordedEvent], None]
"""Applies one event to the read model through ``conn``; must not commit or roll back."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mesh_projections (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS mesh_projection_positions (
    name TEXT NOT NULL, slot INTEGER NOT NULL, position INTEGER NOT NULL,
    PRIMARY KEY (name, slot)) WITHOUT ROWID;
"""


@dataclass
class ProjectionCheckpoint:
    """Where a projection stands: ``version`` for a stream projection, ``positions``
    (slot -> last position applied) for a category or all projection."""

    version: int = 0
    positions: Positions = field(default_factory=dict)

    def covers(self, event: RecordedEvent, by_version: bool) -> bool:
        """Whether ``event`` is already applied."""
        if by_version:
            return event.version <= self.version
        return event.position <= self.positions.get(event.slot, 0)


class SqliteCheckpointStore:
    """A sqlite3 database holding read models and their projections' checkpoints.

    One connection (WAL mode), used by one worker thread at a time. ``run`` and
    ``query`` give the application transactional access to the same database.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a power cut may lose the last commits, never split one.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                if not conn.in_transaction:
                    raise RuntimeError("the work ended the transaction itself; it must not "
                                       "commit or roll back")
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(conn)`` in one transaction, in a worker thread; its result."""
        return await asyncio.to_thread(self._transaction, work)

    async def query(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """The rows of one read-only statement."""
        return await self.run(lambda conn: conn.execute(sql, parameters).fetchall())

    async def load(self, name: str) -> ProjectionCheckpoint:
        """The committed checkpoint of projection ``name`` (zero if it never ran)."""
        def read(conn: sqlite3.Connection) -> ProjectionCheckpoint:
            row = conn.execute("SELECT version FROM mesh_projections WHERE name = ?",
                               (name,)).fetchone()
            rows = conn.execute("SELECT slot, position FROM mesh_projection_positions "
                                "WHERE name = ?", (name,)).fetchall()
            return ProjectionCheckpoint(row[0] if row else 0, dict(rows))

        return await self.run(read)

    async def commit(self, name: str, handler: Handler, events: Sequence[RecordedEvent],
                     version: int, positions: Positions) -> None:
        """Apply ``events`` with ``handler`` and save the checkpoint (``version``, and
        the slots of ``positions`` that moved), all in one transaction."""
        def apply(conn: sqlite3.Connection) -> None:
            for event in events:
                handler(conn, event)
                if not conn.in_transaction:
                    raise RuntimeError(f"the handler of projection {name!r} ended the "
                                       "transaction itself; it must not commit or roll back")
            conn.execute(
                "INSERT INTO mesh_projections (name, version, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
                "updated = excluded.updated", (name, version, time.time()))
            conn.executemany(
                "INSERT INTO mesh_projection_positions (name, slot, position) VALUES (?, ?, ?) "
                "ON CONFLICT (name, slot) DO UPDATE SET position = excluded.position",
                [(name, slot, position) for slot, position in positions.items()])

        await self.run(apply)

    async def reset(self, name: str) -> None:
        """Forget projection ``name``'s checkpoint (to rebuild its read model: clear it too)."""
        def forget(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM mesh_projections WHERE name = ?", (name,))
            conn.execute("DELETE FROM mesh_projection_positions WHERE name = ?", (name,))

        await self.run(forget)

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def close(self) -> None:
        await asyncio.to_thread(self._close)


class ProjectionRunner:
    """Feeds the events of one ``stream``, a ``category`` or ``all`` streams to
    ``handler``, committing the handler's changes and the checkpoint together.

    ``setup(conn)`` (optional) runs once per start, in its own transaction, to
    create the read model's tables. A transaction holds at most ``batch_size``
    events; a checkpoint that only skips unmatched log entries (category
    projections) is saved at most every ``checkpoint_every`` seconds. A handler
    that raises rolls its whole batch back and stops the runner (``run`` raises):
    fix it and start again, it resumes at the first unapplied event.
    """

    def __init__(
        self, mesh: Mesh, name: str, handler: Handler, *, store: SqliteCheckpointStore,
        stream: str | None = None, category: str | None = None, all: bool = False,
        setup: Callable[[sqlite3.Connection], None] | None = None, batch_size: int = 100,
        checkpoint_every: float = 1.0, checkpoint_interval: int = 0,
    ) -> None:
        if [stream is not None, category is not None, all].count(True) != 1:
            raise ValueError("give exactly one of stream, category or all=True")
        self._mesh = mesh
        self.name = name
        self._handler = handler
        self.store = store
        self._stream = stream
        self._category = category
        self._all = all
        self._setup = setup
        self._batch_size = batch_size
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = checkpoint_interval
        self.checkpoint = ProjectionCheckpoint()
        """What is committed (after ``run`` started)."""
        self.processed = 0
        """Events applied by this runner (all runs)."""
        self._sub: Subscription | None = None
        self._stopping = False

    async def run(self) -> None:
        """Project until cancelled or ``stop()``ped (which commits what is pending)."""
        await self._run(until_caught_up=False)

    async def run_until_caught_up(self) -> int:
        """Project every event stored now, commit, and return how many were applied."""
        before = self.processed
        await self._run(until_caught_up=True)
        return self.processed - before

    async def stop(self) -> None:
        """Make ``run`` return after committing what it holds."""
        self._stopping = True
        if self._sub is not None:
            await self._sub.close()

    async def _run(self, until_caught_up: bool) -> None:
        self._stopping = False
        if self._setup is not None:
            await self.store.run(self._setup)
        self.checkpoint = await self.store.load(self.name)
        sub = self._mesh.events.subscribe(
            self._stream, category=self._category, all=self._all,
            after_version=self.checkpoint.version,
            after_positions=self.checkpoint.positions, start=BEGINNING,
            include_markers=True, checkpoint_interval=self._checkpoint_interval)
        self._sub = sub
        by_version = self._stream is not None
        batch: list[RecordedEvent] = []
        pending = ProjectionCheckpoint(self.checkpoint.version, {})  # not yet committed
        loop = asyncio.get_running_loop()
        last_commit = loop.time()
        try:
            async with sub:
                if self._stopping:
                    return
                async for item in sub:
                    caught_up = isinstance(item, CaughtUp)
                    if isinstance(item, RecordedEvent):
                        if self.checkpoint.covers(item, by_version) or _covers(pending, item):
                            continue
                        batch.append(item)
                        if by_version:
                            pending.version = max(pending.version, item.version)
                        merge_positions(pending.positions, {item.slot: item.position})
                    elif isinstance(item, Checkpoint | CaughtUp) and not by_version:
                        merge_positions(pending.positions, item.positions)
                    elif isinstance(item, CaughtUp):
                        pending.version = max(pending.version, item.version)
                    idle = sub.buffered == 0
                    if (len(batch) >= self._batch_size or (caught_up and until_caught_up)
                            or (idle and (batch or caught_up))
                            or (idle and loop.time() - last_commit >= self._checkpoint_every)):
                        await self._commit(batch, pending)
                        batch, last_commit = [], loop.time()
                    if caught_up and until_caught_up:
                        return
        finally:
            self._sub = None
        if self._stopping:
            await self._commit(batch, pending)

    async def _commit(self, batch: list[RecordedEvent], pending: ProjectionCheckpoint) -> None:
        moved = {slot: position for slot, position in pending.positions.items()
                 if position > self.checkpoint.positions.get(slot, 0)}
        if not batch and not moved and pending.version <= self.checkpoint.version:
            return
        await self.store.commit(self.name, self._handler, batch, pending.version, moved)
        self.checkpoint.version = pending.version
        self.checkpoint.positions.update(moved)
        pending.positions.clear()
        self.processed += len(batch)


def _covers(pending: ProjectionCheckpoint, event: RecordedEvent) -> bool:
    """``event`` is already in the batch (only possible if a node repeated it)."""
    return event.position <= pending.positions.get(event.slot, 0)
