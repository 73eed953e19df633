"""The scheduler rows' baseline: a Celery app on a Redis broker with one no-op task.

The benchmark imports ``app`` to publish (``noop.apply_async``) and starts the
worker as ``celery -A bench.celery_app worker``; both read the broker URL from
``MESH_BENCH_CELERY_BROKER``. Settings that matter for the comparison:

* ``task_acks_late``: a message is acknowledged after its task ran, so a task
  whose worker dies is redelivered: at-least-once, as a Mesh lease is (the
  broker work per task is the same as with early acks, only its moment moves);
* ``task_ignore_result``: no result backend; a finished Mesh job keeps an empty
  result, a finished Celery task only its acknowledgement;
* ``broker_pool_limit``: enough producers for every publishing thread.

Each worker process counts the tasks it ran in an 8-byte file of its own, in the
directory ``MESH_BENCH_CELERY_COUNTERS`` (``bench.counter``), which the benchmark
reads: counting costs a task no I/O.
"""

from __future__ import annotations

import os
import threading

from celery import Celery

from bench import counter

BROKER_ENV = "MESH_BENCH_CELERY_BROKER"
COUNTERS_ENV = "MESH_BENCH_CELERY_COUNTERS"
PRODUCERS = 64
"""Connections in the publishing pool: at least the threads that publish at once."""

app = Celery("bench", broker=os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    broker_pool_limit=PRODUCERS,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_lock = threading.Lock()
_counters: dict[int, counter.Counter] = {}
"""This process's counter, by pid (a prefork child must not write its parent's)."""


def _count() -> None:
    """One more task ran (a process's threads share its counter)."""
    with _lock:
        mine = _counters.get(os.getpid())
        if mine is None:
            mine = _counters[os.getpid()] = counter.writer(os.environ[COUNTERS_ENV])
        mine.add(1)


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop(payload: str) -> None:
    """The no-op job: counted, nothing else."""
    del payload
    _count()
