"""Every job of one group: unfinished jobs as `Job` objects, finished ones frozen.

A finished job (succeeded, dead or cancelled) is kept for its retention, a day
by default, and changes no more, unless a dead one is sent back to its queue.
Kept as objects (the job, its backoff, its attempts and their list), retained
jobs were objects that every full collection of the garbage collector walked:
with 200,000 finished jobs (and their request ids) one took 0.6 s, a pause of
the whole node, back each time a quarter more objects had been made. Frozen
into tuples of strings, bytes and numbers (`Job.frozen`), they are skipped, as
cache entries and events are: 0.03 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from nodes.scheduler.model import CANCELLED, SUCCEEDED, FrozenJob, Job

__all__ = ["JobTable"]

# Where `Job.frozen` puts the fields read without thawing.
_JOB_ID: Final = 0
_RETENTION_NS: Final = 8
_STATE: Final = 11
_FINISH_NS: Final = 22


class JobTable:
    """Job id -> job. A finished job comes back from `get` as a new `Job` each
    time: it is read, never changed in place (`revive` makes it live again)."""

    def __init__(self) -> None:
        self._live: dict[str, Job] = {}
        self._finished: dict[str, FrozenJob] = {}

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)

    def __iter__(self) -> Iterator[str]:
        """The job ids."""
        yield from list(self._live)
        yield from list(self._finished)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._live or job_id in self._finished

    def get(self, job_id: str) -> Job | None:
        job = self._live.get(job_id)
        if job is not None:
            return job
        frozen = self._finished.get(job_id)
        return Job.thawed(frozen) if frozen is not None else None

    def __getitem__(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def live_job(self, job_id: str) -> Job | None:
        """The unfinished job ``job_id``, itself (None if it finished or is unknown)."""
        return self._live.get(job_id)

    def add(self, job: Job) -> None:
        """A new job, or one read back from a snapshot or the disk."""
        if job.finished:
            self._finished[job.job_id] = job.frozen()
        else:
            self._live[job.job_id] = job

    def finish(self, job: Job) -> None:
        """``job`` (live until now) just finished: keep it frozen."""
        del self._live[job.job_id]
        self._finished[job.job_id] = job.frozen()

    def revive(self, job: Job) -> None:
        """``job``, a thawed finished job, is unfinished again: it is the live one now."""
        del self._finished[job.job_id]
        self._live[job.job_id] = job

    def remove(self, job_id: str) -> None:
        if self._live.pop(job_id, None) is None:
            del self._finished[job_id]

    def live(self) -> Iterator[Job]:
        """The unfinished jobs, themselves."""
        return iter(list(self._live.values()))

    def retained(self) -> Iterator[tuple[int, str]]:
        """``(when its retention ends, job id)`` of every succeeded or cancelled job
        (dead ones stay until sent back or purged), read without thawing them."""
        for frozen in self._finished.values():
            if frozen[_STATE] in (SUCCEEDED, CANCELLED):
                yield frozen[_FINISH_NS] + frozen[_RETENTION_NS], frozen[_JOB_ID]

    def values(self) -> Iterator[Job]:
        """Every job, the finished ones thawed (for snapshots and a rewrite of the disk)."""
        yield from self.live()
        for frozen in list(self._finished.values()):
            yield Job.thawed(frozen)

    def clear(self) -> None:
        self._live.clear()
        self._finished.clear()
