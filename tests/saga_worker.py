"""A saga worker in its own process, for the saga acceptance test:
``python -m tests.saga_worker EFFECTS_DB CONCURRENCY``.

Runs ``mesh.sagas.worker(order)`` until killed (the test SIGKILLs it). The
order saga is reserve -> (charge || points) -> ship, each step with a
compensation. Handlers change an "external system", the sqlite file
EFFECTS_DB, the way one keyed by idempotency key would: an action inserts its
effect once per key and is refused once the key was undone; a compensation
writes a tombstone for the action's key and marks its effect reversed.

Failures are injected deterministically by saga id (`plan`), so the test's
checker knows them: a step that fails for good (before any effect), a
compensation that fails twice then works, or one that always fails (transient
errors until its attempts run out: NEEDS_ATTENTION). Prints RUNNING once
started. The cluster comes from MESH_ETCD_ENDPOINTS and MESH_CLUSTER.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import sqlite3
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import Mesh
from clients.job_runtime import PermanentJobError
from clients.saga import SagaType, StepContext

QUEUE = "orders"
STEPS = ("reserve", "charge", "points", "ship")
STAGE = {"reserve": 0, "charge": 1, "points": 1, "ship": 2}
SHIP_TIMEOUT = 4.0
"""Seconds ship may take from its dispatch (then it is cancelled, outcome UNKNOWN)."""
SLOW_SHIP = 10.0
"""Seconds a slow ship takes before it acts."""
TRANSIENT_UNDO_FAILURES = 2
"""Attempts of a flaky compensation that fail before one works."""
LATENCY = 0.05
"""Longest a call to the external system takes, before and after its effect:
a worker killed meanwhile leaves an attempt that may or may not have acted."""


def _call_latency() -> None:
    time.sleep(random.uniform(0, LATENCY))


@dataclass(frozen=True)
class Plan:
    """The failures injected into one saga."""

    fail_step: str = ""
    """The step whose action fails for good (PermanentJobError, before any effect)."""
    undo_fails: str = ""
    """The step whose compensation fails (before any effect)."""
    undo_always: bool = False
    """Whether it fails on every attempt (else only on the first ones)."""
    slow_ship: bool = False
    """Whether ship takes longer than its timeout (its outcome is then UNKNOWN)."""


def plan(saga_id: str) -> Plan:
    """1 % of sagas: ship fails and an earlier compensation always fails; 1 %: ship
    fails and an earlier compensation fails twice; 8 %: one step fails; 3 %: ship
    outlasts its timeout."""
    h = int.from_bytes(hashlib.sha256(saga_id.encode()).digest()[:8], "big")
    bucket, rest = h % 1000, h // 1000
    if bucket < 10:
        return Plan("ship", STEPS[rest % 3], undo_always=True)
    if bucket < 20:
        return Plan("ship", STEPS[rest % 3])
    if bucket < 100:
        return Plan(STEPS[rest % 4])
    if bucket < 130:
        return Plan(slow_ship=True)
    return Plan()


def action_key(saga_id: str, step: str) -> str:
    """StepTask.idempotency_key of a step's action."""
    return f"{saga_id}/{step}/action"


class Effects:
    """The external system: effects by the action's idempotency key, tombstones
    of undone keys, and a log of every handler call (for the test's summary)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 60000")
        return db

    def create(self) -> None:
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript("""
                CREATE TABLE IF NOT EXISTS effects (
                    key TEXT PRIMARY KEY, saga TEXT NOT NULL, step TEXT NOT NULL,
                    reversed INTEGER NOT NULL DEFAULT 0);
                CREATE TABLE IF NOT EXISTS undos (
                    key TEXT PRIMARY KEY, saga TEXT NOT NULL, step TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS calls (
                    saga TEXT NOT NULL, step TEXT NOT NULL, phase TEXT NOT NULL,
                    attempt INTEGER NOT NULL, outcome TEXT NOT NULL, pid INTEGER NOT NULL);
            """)

    def _log(self, db: sqlite3.Connection, saga: str, step: str, phase: str, attempt: int,
             outcome: str) -> None:
        db.execute("INSERT INTO calls VALUES (?, ?, ?, ?, ?, ?)",
                   (saga, step, phase, attempt, outcome, os.getpid()))

    def note(self, saga: str, step: str, phase: str, attempt: int, outcome: str) -> None:
        with closing(self._connect()) as db:
            self._log(db, saga, step, phase, attempt, outcome)

    def do(self, saga: str, step: str, attempt: int) -> str:
        """Apply the action once: 'applied', 'repeat', or 'refused' (undone already)."""
        key = action_key(saga, step)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT 1 FROM undos WHERE key = ?", (key,)).fetchone():
                outcome = "refused"
            else:
                cursor = db.execute("INSERT OR IGNORE INTO effects (key, saga, step) "
                                    "VALUES (?, ?, ?)", (key, saga, step))
                outcome = "applied" if cursor.rowcount else "repeat"
            self._log(db, saga, step, "action", attempt, outcome)
            db.execute("COMMIT")
        return outcome

    def undo(self, saga: str, step: str, attempt: int) -> str:
        """Undo the action (whether or not it happened): 'undone' or 'repeat'."""
        key = action_key(saga, step)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            cursor = db.execute("INSERT OR IGNORE INTO undos VALUES (?, ?, ?)",
                                (key, saga, step))
            db.execute("UPDATE effects SET reversed = 1 WHERE key = ?", (key,))
            outcome = "undone" if cursor.rowcount else "repeat"
            self._log(db, saga, step, "compensation", attempt, outcome)
            db.execute("COMMIT")
        return outcome

    def read(self) -> tuple[dict[str, bool], set[str], list[tuple[Any, ...]]]:
        """(effect key -> reversed, undone keys, every call)."""
        with closing(self._connect()) as db:
            effects = {k: bool(r) for k, r in db.execute("SELECT key, reversed FROM effects")}
            undos = {k for (k,) in db.execute("SELECT key FROM undos")}
            calls = db.execute("SELECT * FROM calls").fetchall()
        return effects, undos, calls


def order_type(effects: Effects | None = None) -> SagaType:
    """The order saga; ``effects`` None: for registering only (no handler runs)."""
    saga = SagaType("order", queue=QUEUE)

    def act(name: str) -> Any:
        def run(step: StepContext) -> dict[str, str]:
            assert effects is not None
            attempt = step.job.attempt
            # Logged first: an action whose job the saga says never ran must
            # not have started at all.
            effects.note(step.saga_id, name, "action", attempt, "started")
            if plan(step.saga_id).fail_step == name:
                effects.note(step.saga_id, name, "action", attempt, "injected-fail")
                raise PermanentJobError(f"{name} declined (injected)")
            if name == "ship" and plan(step.saga_id).slow_ship:
                time.sleep(SLOW_SHIP)  # (a late action is refused once undone)
            _call_latency()
            outcome = effects.do(step.saga_id, name, attempt)
            _call_latency()
            if outcome == "refused":
                raise PermanentJobError(f"{name}: {step.idempotency_key} was undone already")
            return {"step": name, "key": step.idempotency_key}
        return run

    def undo(name: str) -> Any:
        def run(step: StepContext) -> None:
            assert effects is not None
            attempt = step.job.attempt
            p = plan(step.saga_id)
            if p.undo_fails == name and (p.undo_always or attempt <= TRANSIENT_UNDO_FAILURES):
                effects.note(step.saga_id, name, "compensation", attempt, "injected-fail")
                raise RuntimeError(f"cannot undo {name} (injected, attempt {attempt})")
            _call_latency()
            effects.undo(step.saga_id, name, attempt)
            _call_latency()
        return run

    for name in STEPS:
        saga.step(name, parallel=name == "points",
                  timeout=SHIP_TIMEOUT if name == "ship" else None)(act(name))
        saga.compensate(name)(undo(name))
    return saga


async def main(path: str, concurrency: int) -> None:
    order = order_type(Effects(Path(path)))
    async with Mesh(timeout=5) as mesh:
        worker = mesh.sagas.worker(order, concurrency=concurrency, lease=3, poll=1)
        print("RUNNING", flush=True)
        await worker.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
