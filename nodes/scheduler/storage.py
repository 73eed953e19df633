"""The scheduler on disk: its tables in the node's journal, writes and read-back.

Memory holds the state; the disk holds a copy so that a restarted node gets its
groups back (`SchedulerMachine` loads it when its group was read back from the
journal). A job is one row holding its whole record, rewritten at each change;
every write is queued with the seq of the command that caused it, so the group
counts the command as durable only once the rows are on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mesh.scheduler.v1 import scheduler_replication_pb2 as spb
from nodes.replication.journal import JournalLike
from nodes.scheduler.model import Job, Schedule
from nodes.scheduler.queues import Queue
from nodes.scheduler.state import SchedulerState

if TYPE_CHECKING:
    from nodes.replication.group import Group

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
"""
TABLES = ("scheduler_jobs", "scheduler_schedules", "scheduler_queues")

_UPSERT_JOB = "INSERT OR REPLACE INTO scheduler_jobs (group_id, job_id, record) VALUES (?, ?, ?)"
_DELETE_JOB = "DELETE FROM scheduler_jobs WHERE group_id = ? AND job_id = ?"
_UPSERT_SCHEDULE = ("INSERT OR REPLACE INTO scheduler_schedules (group_id, queue, schedule_id, "
                    "record) VALUES (?, ?, ?, ?)")
_DELETE_SCHEDULE = ("DELETE FROM scheduler_schedules WHERE group_id = ? AND queue = ? "
                    "AND schedule_id = ?")
_UPSERT_QUEUE = "INSERT OR REPLACE INTO scheduler_queues (group_id, queue, record) VALUES (?, ?, ?)"


class Storage:
    """Disk writes and read-back for one group's scheduler."""

    def __init__(self, journal: JournalLike, group: Group) -> None:
        self._journal = journal
        self._group = group
        self._gid = group.group_id

    def jobs(self, seq: int, epoch: int, jobs: Sequence[Job]) -> None:
        if jobs:
            gid = self._gid
            self._journal.write(self._group, seq, epoch, _UPSERT_JOB, *[
                (gid, j.job_id, j.to_record().SerializeToString()) for j in jobs])

    def removed(self, seq: int, epoch: int, job_ids: Sequence[str]) -> None:
        if job_ids:
            gid = self._gid
            self._journal.write(self._group, seq, epoch, _DELETE_JOB,
                                *[(gid, job_id) for job_id in job_ids])

    def queue(self, seq: int, epoch: int, queue: Queue) -> None:
        self._journal.write(self._group, seq, epoch, _UPSERT_QUEUE, self._queue_row(queue))

    def schedule(self, seq: int, epoch: int, schedule: Schedule) -> None:
        self._journal.write(self._group, seq, epoch, _UPSERT_SCHEDULE,
                            self._schedule_row(schedule))

    def schedule_removed(self, seq: int, epoch: int, queue: str, schedule_id: str) -> None:
        self._journal.write(self._group, seq, epoch, _DELETE_SCHEDULE,
                            (self._gid, queue, schedule_id))

    def replace(self, state: SchedulerState) -> None:
        """Make the disk hold exactly ``state`` (a snapshot was installed), at the
        group's current position."""
        group = self._group
        seq, epoch = group.log.last_seq, group.log.last_epoch
        self._journal.clear(group, TABLES)
        self.jobs(seq, epoch, list(state.jobs.values()))
        write = self._journal.write
        if state.schedules:
            write(group, seq, epoch, _UPSERT_SCHEDULE,
                  *[self._schedule_row(s) for s in state.schedules.values()])
        if state.queues:
            write(group, seq, epoch, _UPSERT_QUEUE,
                  *[self._queue_row(q) for q in state.queues.values()])

    def load(self, state: SchedulerState, now_ns: int) -> None:
        """Read the group's rows back into ``state`` (start-up only: synchronous)."""
        query, gid = self._journal.query, (self._gid,)
        jobs = [Job.of(spb.JobRecord.FromString(bytes(r)))
                for (r,) in query("SELECT record FROM scheduler_jobs WHERE group_id = ?", gid)]
        schedules = [spb.ScheduleRecord.FromString(bytes(r)) for (r,) in query(
            "SELECT record FROM scheduler_schedules WHERE group_id = ?", gid)]
        queues = [spb.QueueRecord.FromString(bytes(r)) for (r,) in query(
            "SELECT record FROM scheduler_queues WHERE group_id = ?", gid)]
        state.load(jobs, schedules, queues, now_ns)

    def _queue_row(self, q: Queue) -> tuple[Any, ...]:
        t = q.totals
        record = spb.QueueRecord(queue=q.name, succeeded_total=t.succeeded,
                                 failed_attempts_total=t.failed_attempts,
                                 lease_losses_total=t.lease_losses)
        return (self._gid, q.name, record.SerializeToString())

    def _schedule_row(self, s: Schedule) -> tuple[Any, ...]:
        r = s.record
        return (self._gid, r.queue, r.schedule_id, r.SerializeToString())
