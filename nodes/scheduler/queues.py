"""One queue's indexes: waiting jobs by readiness and priority, dead letters, unique keys.

Waiting jobs sit in one of two kinds of heaps: a ready heap per priority, keyed
by (run time, order), and one delayed heap keyed the same way for jobs whose
run time had not come when they were indexed. An entry names its job by id (a
tuple of numbers and a string, which the garbage collector does not track: a
backlog of a million jobs is a million entries). Moving due jobs from the delayed
heap to the ready ones (`promote`) changes no job, only where it is found, so
the primary does it on its own clock without a command. Removing a job from a
heap is lazy (its entry goes stale and is skipped when it reaches the top);
heaps are rebuilt once stale entries outnumber live ones.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nodes.scheduler.model import (
    CANCELLED,
    DELAYED,
    LEASED,
    NOWHERE,
    READY,
    SUCCEEDED,
    Job,
    Request,
)

if TYPE_CHECKING:
    from nodes.scheduler.table import JobTable

__all__ = ["PRIORITIES", "Queue", "Totals"]

PRIORITIES = 10
_COMPACT_AT = 1024

Entry = tuple[int, int, str]
"""(run_ns, order, job_id): heap entry; live while the job is there with that order."""


@dataclass(slots=True)
class Totals:
    """A queue's lifetime counters (replicated and stored)."""

    succeeded: int = 0
    failed_attempts: int = 0
    lease_losses: int = 0


class Queue:
    """The jobs of one queue name in one group, indexed."""

    __slots__ = ("_jobs", "dead", "delayed", "leased", "n_cancelled", "n_delayed", "n_done",
                 "n_ready", "name", "ready", "requests", "stale", "totals", "unique")

    def __init__(self, name: str, jobs: JobTable) -> None:
        self.name = name
        self._jobs = jobs
        self.ready: list[list[Entry]] = [[] for _ in range(PRIORITIES)]
        self.delayed: list[Entry] = []
        self.n_ready = self.n_delayed = self.n_done = self.n_cancelled = 0
        self.leased: dict[str, Job] = {}
        self.stale = 0
        self.dead: list[tuple[int, str]] = []
        """Dead jobs as (finish_ns, job_id), sorted."""
        self.unique: dict[str, Job] = {}
        """Unique key -> the job that took it last (it may no longer hold it)."""
        self.requests: dict[str, Request] = {}
        """Request id -> the job its Enqueue made (until the primary forgets it)."""
        self.totals = Totals()

    @property
    def unfinished(self) -> int:
        return self.n_ready + self.n_delayed + len(self.leased)

    # -- waiting jobs -----------------------------------------------------------

    def add_waiting(self, job: Job, now_ns: int) -> None:
        """Index a waiting job: ready if its run time has come by ``now_ns``."""
        entry = (job.run_ns, job.order, job.job_id)
        if job.run_ns <= now_ns:
            heapq.heappush(self.ready[job.priority], entry)
            job.where = READY
            self.n_ready += 1
        else:
            heapq.heappush(self.delayed, entry)
            job.where = DELAYED
            self.n_delayed += 1

    def remove_waiting(self, job: Job) -> None:
        """Take a job out of the index (its entry goes stale)."""
        if job.where == READY:
            self.n_ready -= 1
        elif job.where == DELAYED:
            self.n_delayed -= 1
        else:
            return
        job.where = NOWHERE
        self.stale += 1
        if self.stale >= _COMPACT_AT and self.stale > self.n_ready + self.n_delayed:
            self._compact()

    def promote(self, now_ns: int) -> bool:
        """Move delayed jobs whose run time has come to the ready heaps; whether any."""
        delayed = self.delayed
        moved = False
        while delayed and delayed[0][0] <= now_ns:
            entry = heapq.heappop(delayed)
            job = self._holding(entry, DELAYED)
            if job is None:
                self.stale -= 1
                continue
            heapq.heappush(self.ready[job.priority], entry)
            job.where = READY
            self.n_delayed -= 1
            self.n_ready += 1
            moved = True
        return moved

    def next_due(self) -> int | None:
        """Run time of the earliest delayed job, if any."""
        delayed = self.delayed
        while delayed:
            if self._holding(delayed[0], DELAYED) is not None:
                return delayed[0][0]
            heapq.heappop(delayed)
            self.stale -= 1
        return None

    def peek_ready(self) -> tuple[tuple[int, int, int], Job] | None:
        """The ready job Claim takes next, with its sort key (-priority, run, order)."""
        if not self.n_ready:
            return None
        for priority in range(PRIORITIES - 1, -1, -1):
            heap = self.ready[priority]
            while heap:
                run_ns, order, _ = heap[0]
                job = self._holding(heap[0], READY)
                if job is not None:
                    return (-priority, run_ns, order), job
                heapq.heappop(heap)
                self.stale -= 1
        return None

    def take(self, job: Job) -> None:
        """Pop ``job``, which `peek_ready` just returned, out of its heap."""
        heapq.heappop(self.ready[job.priority])
        job.where = NOWHERE
        self.n_ready -= 1

    def oldest_ready(self) -> int | None:
        """Earliest run time among ready jobs."""
        oldest: int | None = None
        for heap in self.ready:
            while heap:
                if self._holding(heap[0], READY) is not None:
                    run_ns = heap[0][0]
                    oldest = run_ns if oldest is None else min(oldest, run_ns)
                    break
                heapq.heappop(heap)
                self.stale -= 1
        return oldest

    def _holding(self, entry: Entry, where: int) -> Job | None:
        """The job ``entry`` names if the entry is live (the job is still indexed
        ``where``, with the entry's order), else None (a stale entry)."""
        job = self._jobs.live_job(entry[2])
        return job if job is not None and job.where == where and job.order == entry[1] \
            else None

    def _compact(self) -> None:
        holding = self._holding
        for i, heap in enumerate(self.ready):
            self.ready[i] = [e for e in heap if holding(e, READY) is not None]
            heapq.heapify(self.ready[i])
        self.delayed = [e for e in self.delayed if holding(e, DELAYED) is not None]
        heapq.heapify(self.delayed)
        self.stale = 0

    # -- other states -------------------------------------------------------------

    def count_in(self, job: Job, sign: int) -> None:
        """Count a job in (1) or out (-1) of its state's tally (not WAITING, which
        the index counts)."""
        state = job.state
        if state == LEASED:
            if sign > 0:
                self.leased[job.job_id] = job
            else:
                self.leased.pop(job.job_id, None)
        elif state == SUCCEEDED:
            self.n_done += sign
        elif state == CANCELLED:
            self.n_cancelled += sign
        elif job.finished:  # DEAD
            entry = (job.finish_ns, job.job_id)
            if sign > 0:
                bisect.insort(self.dead, entry)
            else:
                i = bisect.bisect_left(self.dead, entry)
                if i < len(self.dead) and self.dead[i] == entry:
                    del self.dead[i]

    def dead_after(self, after: tuple[int, str] | None, limit: int) -> list[str]:
        """Ids of up to ``limit`` dead jobs after ``after`` (in death order)."""
        start = 0 if after is None else bisect.bisect_right(self.dead, after)
        return [job_id for _, job_id in self.dead[start:start + limit]]

    # -- unique keys ----------------------------------------------------------------

    def holder(self, key: str, now_ns: int) -> Job | None:
        """The job holding unique ``key`` now, if any."""
        job = self.unique.get(key)
        return job if job is not None and job.holds_key(now_ns) else None

    def release_key(self, job: Job) -> None:
        if job.unique_key and self.unique.get(job.unique_key) is job:
            del self.unique[job.unique_key]
