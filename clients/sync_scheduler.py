"""The blocking facade of the job scheduler: ``SyncMesh.scheduler`` and its worker pool."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from clients.job_types import (
    CancelResult,
    ClaimedJob,
    DeadLetterPage,
    EnqueueResult,
    FailResult,
    Job,
    JobBackoff,
    JobTemplate,
    Payload,
    QueueStats,
    Schedule,
    SchedulePage,
)
from clients.scheduler import PurgeResult, RequeueResult
from clients.worker import Handler, Worker, WorkerStats

if TYPE_CHECKING:
    from clients.mesh import Mesh
    from clients.sync import _Loop


class SyncWorker:
    """A blocking handle on a ``Worker`` running on the client's loop thread. Plain
    handlers run in threads of their own, async ones on that loop."""

    def __init__(self, worker: Worker, loop: _Loop) -> None:
        self.worker = worker
        self._loop = loop

    @property
    def stats(self) -> WorkerStats:
        return self.worker.stats

    @property
    def running(self) -> int:
        return self.worker.running

    def start(self) -> SyncWorker:
        self._loop.run(self.worker.start())
        return self

    def stop(self, graceful: bool = True, grace: float | None = None) -> None:
        self._loop.run(self.worker.stop(graceful, grace))

    def wait(self) -> None:
        self._loop.run(self.worker.wait())

    def run(self) -> None:
        """Start, and block until stopped. From the main thread, SIGTERM and SIGINT
        stop it gracefully (a second one at once), as ``Worker.run``."""
        self.start()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        graceful = not self.worker.stopping
        asyncio.run_coroutine_threadsafe(self.worker.stop(graceful=graceful), self._loop.loop)

    def __enter__(self) -> SyncWorker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SyncScheduler:
    """Blocking versions of ``SchedulerClient``'s calls, and ``worker`` for a pool."""

    def __init__(self, mesh: Mesh, loop: _Loop) -> None:
        self._mesh = mesh
        self._scheduler = mesh.scheduler
        self._loop = loop

    def enqueue(
        self, queue: str, type: str, payload: Payload = b"", *, priority: int = 0,
        run_at: float | dt.datetime | None = None, delay: float | None = None,
        max_attempts: int = 0, backoff: JobBackoff | None = None,
        job_timeout: float | None = None, unique_key: str = "",
        unique_ttl: float | None = None, strict_unique: bool = False,
        retention: float | None = None, request_id: str = "", timeout: float | None = None,
    ) -> str:
        return self.enqueue_result(
            queue, type, payload, priority=priority, run_at=run_at, delay=delay,
            max_attempts=max_attempts, backoff=backoff, job_timeout=job_timeout,
            unique_key=unique_key, unique_ttl=unique_ttl, strict_unique=strict_unique,
            retention=retention, request_id=request_id, timeout=timeout).job_id

    def enqueue_result(
        self, queue: str, type: str, payload: Payload = b"", *, priority: int = 0,
        run_at: float | dt.datetime | None = None, delay: float | None = None,
        max_attempts: int = 0, backoff: JobBackoff | None = None,
        job_timeout: float | None = None, unique_key: str = "",
        unique_ttl: float | None = None, strict_unique: bool = False,
        retention: float | None = None, request_id: str = "", timeout: float | None = None,
    ) -> EnqueueResult:
        return self._loop.run(self._scheduler.enqueue_result(
            queue, type, payload, priority=priority, run_at=run_at, delay=delay,
            max_attempts=max_attempts, backoff=backoff, job_timeout=job_timeout,
            unique_key=unique_key, unique_ttl=unique_ttl, strict_unique=strict_unique,
            retention=retention, request_id=request_id, timeout=timeout))

    def claim(self, queues: str | Sequence[str], *, worker_id: str = "", max_jobs: int = 1,
              lease: float = 30.0, wait: float = 0.0,
              timeout: float | None = None) -> list[ClaimedJob]:
        return self._loop.run(self._scheduler.claim(
            queues, worker_id=worker_id, max_jobs=max_jobs, lease=lease, wait=wait,
            timeout=timeout))

    def heartbeat(self, job_id: str, lease_token: int, *, extend: float | None = None,
                  timeout: float | None = None) -> float | None:
        return self._loop.run(self._scheduler.heartbeat(job_id, lease_token, extend=extend,
                                                        timeout=timeout))

    def complete(self, job_id: str, lease_token: int, result: Payload | None = None, *,
                 timeout: float | None = None) -> float | None:
        return self._loop.run(self._scheduler.complete(job_id, lease_token, result,
                                                       timeout=timeout))

    def fail(self, job_id: str, lease_token: int, error: str | BaseException, *,
             retryable: bool = True, retry_delay: float | None = None,
             timeout: float | None = None) -> FailResult:
        return self._loop.run(self._scheduler.fail(
            job_id, lease_token, error, retryable=retryable, retry_delay=retry_delay,
            timeout=timeout))

    def cancel(self, job_id: str, *, timeout: float | None = None) -> CancelResult:
        return self._loop.run(self._scheduler.cancel(job_id, timeout=timeout))

    def get_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._loop.run(self._scheduler.get_job(job_id, timeout=timeout))

    def stats(self, queue: str, *, timeout: float | None = None) -> QueueStats:
        return self._loop.run(self._scheduler.stats(queue, timeout=timeout))

    def list_dead_letters(self, queue: str, *, page_size: int = 0, page_token: str = "",
                          timeout: float | None = None) -> DeadLetterPage:
        return self._loop.run(self._scheduler.list_dead_letters(
            queue, page_size=page_size, page_token=page_token, timeout=timeout))

    def dead_letters(self, queue: str, *, page_size: int = 0,
                     timeout: float | None = None) -> Iterator[Job]:
        return self._loop.iterate(self._scheduler.dead_letters(
            queue, page_size=page_size, timeout=timeout))

    def requeue_dead_letters(self, queue: str, job_ids: Iterable[str] | None = None, *,
                             timeout: float | None = None) -> RequeueResult:
        return self._loop.run(self._scheduler.requeue_dead_letters(queue, job_ids,
                                                                   timeout=timeout))

    def purge_dead_letters(self, queue: str, job_ids: Iterable[str] | None = None, *,
                           all: bool = False, timeout: float | None = None) -> PurgeResult:
        return self._loop.run(self._scheduler.purge_dead_letters(queue, job_ids, all=all,
                                                                 timeout=timeout))

    def create_schedule(self, queue: str, schedule_id: str, cron: str, template: JobTemplate,
                        *, timezone: str = "", replace: bool = False,
                        timeout: float | None = None) -> Schedule:
        return self._loop.run(self._scheduler.create_schedule(
            queue, schedule_id, cron, template, timezone=timezone, replace=replace,
            timeout=timeout))

    def delete_schedule(self, queue: str, schedule_id: str, *,
                        timeout: float | None = None) -> bool:
        return self._loop.run(self._scheduler.delete_schedule(queue, schedule_id,
                                                              timeout=timeout))

    def list_schedules(self, queue: str, *, page_size: int = 0, page_token: str = "",
                       timeout: float | None = None) -> SchedulePage:
        return self._loop.run(self._scheduler.list_schedules(
            queue, page_size=page_size, page_token=page_token, timeout=timeout))

    def schedules(self, queue: str, *, timeout: float | None = None) -> Iterator[Schedule]:
        return self._loop.iterate(self._scheduler.schedules(queue, timeout=timeout))

    def worker(self, queues: str | Sequence[str], handlers: Mapping[str, Handler],
               **options: Any) -> SyncWorker:
        """A worker pool (not started): ``.run()`` blocks until SIGTERM; or ``with``."""

        async def make() -> Worker:
            return Worker(self._mesh, queues, handlers, **options)

        return SyncWorker(self._loop.run(make()), self._loop)
