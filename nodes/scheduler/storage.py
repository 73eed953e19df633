"""The scheduler on disk: its tables in the node's journal, writes and read-back.

Memory holds the state; the disk holds a copy so that a restarted node gets its
groups back (`SchedulerMachine` loads it when its group was read back from the
journal). A job is one row holding its whole record, rewritten at each change.
`Storage` describes each change as rows (`Write`, `Clear`); the machine returns
them from ``apply`` and the group queues them with the seq of the command that
caused them, so it counts the command as durable only once they are on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.replication.journal import JournalReader
from nodes.replication.machine import Clear, Persist, Write
from nodes.scheduler.model import Job, Request, Schedule
from nodes.scheduler.queues import Queue
from nodes.scheduler.state import SchedulerState

__all__ = ["SCHEMA", "TABLES", "Storage"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS scheduler_jobs (
    group_id INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (group_id, job_id)
);
CREATE TABLE IF NOT EXISTS scheduler_schedules (
    group_id INTEGER NOT NULL,
    queue TEXT NOT NULL,
    schedule_id TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (group_id, queue, schedule_id)
);
CREATE TABLE IF NOT EXISTS scheduler_queues (
    group_id INTEGER NOT NULL,
    queue TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (group_id, queue)
);
CREATE TABLE IF NOT EXISTS scheduler_requests (
    group_id INTEGER NOT NULL,
    queue TEXT NOT NULL,
    request_id TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (group_id, queue, request_id)
);
"""
TABLES = ("scheduler_jobs", "scheduler_schedules", "scheduler_queues", "scheduler_requests")

_UPSERT_JOB = "INSERT OR REPLACE INTO scheduler_jobs (group_id, job_id, record) VALUES (?, ?, ?)"
_DELETE_JOB = "DELETE FROM scheduler_jobs WHERE group_id = ? AND job_id = ?"
_UPSERT_SCHEDULE = ("INSERT OR REPLACE INTO scheduler_schedules (group_id, queue, schedule_id, "
                    "record) VALUES (?, ?, ?, ?)")
_DELETE_SCHEDULE = ("DELETE FROM scheduler_schedules WHERE group_id = ? AND queue = ? "
                    "AND schedule_id = ?")
_UPSERT_QUEUE = "INSERT OR REPLACE INTO scheduler_queues (group_id, queue, record) VALUES (?, ?, ?)"
_UPSERT_REQUEST = ("INSERT OR REPLACE INTO scheduler_requests (group_id, queue, request_id, "
                   "record) VALUES (?, ?, ?, ?)")
_DELETE_REQUEST = ("DELETE FROM scheduler_requests WHERE group_id = ? AND queue = ? "
                   "AND request_id = ?")


class Storage:
    """The rows of one group's scheduler, and reading them back."""

    def __init__(self, group_id: int) -> None:
        self._gid = group_id

    def jobs(self, jobs: Sequence[Job]) -> list[Persist]:
        gid = self._gid
        return [Write(_UPSERT_JOB, [(gid, j.job_id, j.to_record().SerializeToString())
                                    for j in jobs])] if jobs else []

    def removed(self, job_ids: Sequence[str]) -> list[Persist]:
        gid = self._gid
        return [Write(_DELETE_JOB, [(gid, job_id) for job_id in job_ids])] if job_ids else []

    def queue(self, queue: Queue) -> Write:
        return Write(_UPSERT_QUEUE, [self._queue_row(queue)])

    def schedule(self, schedule: Schedule) -> Write:
        return Write(_UPSERT_SCHEDULE, [self._schedule_row(schedule)])

    def schedule_removed(self, queue: str, schedule_id: str) -> Write:
        return Write(_DELETE_SCHEDULE, [(self._gid, queue, schedule_id)])

    def request(self, queue: str, request_id: str, request: Request) -> Write:
        return Write(_UPSERT_REQUEST, [self._request_row(queue, request_id, request)])

    def requests_forgotten(self, keys: Sequence[tuple[str, str]]) -> list[Persist]:
        gid = self._gid
        return [Write(_DELETE_REQUEST, [(gid, queue, request_id) for queue, request_id in keys])
                ] if keys else []

    def replace(self, state: SchedulerState) -> list[Persist]:
        """What makes the disk hold exactly ``state`` (a snapshot was installed)."""
        writes: list[Persist] = [Clear(TABLES), *self.jobs(list(state.jobs.values()))]
        if state.schedules:
            writes.append(Write(_UPSERT_SCHEDULE,
                                [self._schedule_row(s) for s in state.schedules.values()]))
        if state.queues:
            writes.append(Write(_UPSERT_QUEUE,
                                [self._queue_row(q) for q in state.queues.values()]))
        requests = [self._request_row(q.name, request_id, request)
                    for q in state.queues.values() for request_id, request in q.requests.items()]
        if requests:
            writes.append(Write(_UPSERT_REQUEST, requests))
        return writes

    def load(self, journal: JournalReader, state: SchedulerState, now_ns: int) -> None:
        """Read the group's rows back into ``state`` (start-up only: synchronous)."""
        query, gid = journal.query, (self._gid,)
        jobs = [Job.of(spb.JobRecord.FromString(bytes(r)))
                for (r,) in query("SELECT record FROM scheduler_jobs WHERE group_id = ?", gid)]
        schedules = [spb.ScheduleRecord.FromString(bytes(r)) for (r,) in query(
            "SELECT record FROM scheduler_schedules WHERE group_id = ?", gid)]
        queues = [spb.QueueRecord.FromString(bytes(r)) for (r,) in query(
            "SELECT record FROM scheduler_queues WHERE group_id = ?", gid)]
        requests = [spb.RequestRecord.FromString(bytes(r)) for (r,) in query(
            "SELECT record FROM scheduler_requests WHERE group_id = ?", gid)]
        state.load(jobs, schedules, queues, now_ns, requests)

    def _queue_row(self, q: Queue) -> tuple[Any, ...]:
        t = q.totals
        record = spb.QueueRecord(queue=q.name, succeeded_total=t.succeeded,
                                 failed_attempts_total=t.failed_attempts,
                                 lease_losses_total=t.lease_losses)
        return (self._gid, q.name, record.SerializeToString())

    def _request_row(self, queue: str, request_id: str, request: Request) -> tuple[Any, ...]:
        job_id, expire_ns, _ = request
        record = spb.RequestRecord(queue=queue, request_id=request_id, job_id=job_id,
                                   expire_ns=expire_ns)
        return (self._gid, queue, request_id, record.SerializeToString())

    def _schedule_row(self, s: Schedule) -> tuple[Any, ...]:
        r = s.record
        return (self._gid, r.queue, r.schedule_id, r.SerializeToString())
