"""``meshctl jobs``: look at job queues and their dead letters, and requeue them.

    meshctl jobs stats QUEUE...            jobs by state, lifetime counters, queue latency
    meshctl jobs dead QUEUE [--limit N]    dead jobs: id, type, attempts, when, last error
    meshctl jobs requeue QUEUE [JOB_ID...] make dead jobs ready again (all without ids)
    meshctl jobs get JOB_ID                a job and its attempt history
"""

from __future__ import annotations

import time
from typing import Any

import click

from clients import Job, Mesh, QueueStats
from meshctl import output
from meshctl.context import run, settings


def _ago(when: float | None, now: float) -> str:
    return "-" if when is None else f"{max(0.0, now - when):.1f}s ago"


def format_stats(s: QueueStats, now: float) -> list[str]:
    latency = "-" if s.oldest_ready_time is None else f"{max(0.0, now - s.oldest_ready_time):.2f}s"
    return [
        f"queue {s.queue!r}",
        f"  ready {s.ready}  delayed {s.delayed}  leased {s.leased}  done {s.done}  "
        f"dead {s.dead}  cancelled {s.cancelled}",
        f"  succeeded {s.succeeded_total}  failed attempts {s.failed_attempts_total}  "
        f"lease losses {s.lease_losses_total}  schedules {s.schedules}  "
        f"latency (oldest ready) {latency}",
    ]


def _first_line(text: str, width: int = 60) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def format_dead(jobs: list[Job], total: int, queue: str, now: float) -> list[str]:
    lines = [f"{total} dead job(s) in {queue!r}" + (f", showing {len(jobs)}"
                                                   if len(jobs) < total else "")]
    if jobs:
        lines.append(f"{'JOB':<28} {'TYPE':<18} {'ATTEMPTS':>8}  {'DIED':<12} LAST ERROR")
    for j in jobs:
        lines.append(f"{j.job_id:<28} {j.type[:18]:<18} {j.attempt_count:>4}/{j.max_attempts:<3}"
                     f"  {_ago(j.finish_time, now):<12} {_first_line(j.last_error)}")
    return lines


def format_job(j: Job, now: float) -> list[str]:
    lines = [
        f"job {j.job_id} in {j.queue!r}: {j.type}, {j.state.name}, priority {j.priority}",
        f"  attempts {j.attempt_count}/{j.max_attempts}, lease losses {j.lease_losses}, "
        f"enqueued {_ago(j.enqueue_time, now)}, run time {_ago(j.run_time, now)}",
    ]
    if j.worker_id:
        lines.append(f"  leased by {j.worker_id}")
    if j.unique_key:
        lines.append(f"  unique key {j.unique_key!r}")
    if j.result:
        lines.append(f"  result {j.result[:200]!r}")
    for a in j.attempts:
        took = "" if a.duration is None else f" in {a.duration:.2f}s"
        error = f": {_first_line(a.error, 80)}" if a.error else ""
        lines.append(f"  #{a.number} {a.outcome.name}{took} by {a.worker_id or '-'}{error}")
    return lines


async def _with_mesh(work: Any) -> int:
    async with settings().mesh() as mesh:
        result: int = await work(mesh, settings().json, time.time())
    return result


@click.group("jobs")
def jobs_group() -> None:
    """Job scheduler: queue stats, dead letters, requeue."""


@jobs_group.command("stats")
@click.argument("queues", nargs=-1, required=True, metavar="QUEUE...")
def stats(queues: tuple[str, ...]) -> int:
    """A queue's jobs by state and its counters."""
    async def work(mesh: Mesh, json: bool, now: float) -> int:
        for queue in queues:
            s = await mesh.scheduler.stats(queue)
            if json:
                output.emit(s)
            else:
                print("\n".join(format_stats(s, now)))
        return output.OK

    return run(_with_mesh(work))


@jobs_group.command("dead")
@click.argument("queue")
@click.option("--limit", type=int, default=50, help="Most jobs to show (0: all).")
def dead(queue: str, limit: int) -> int:
    """List a queue's dead jobs, oldest death first."""
    async def work(mesh: Mesh, json: bool, now: float) -> int:
        jobs = mesh.scheduler
        page = await jobs.list_dead_letters(queue, page_size=min(limit or 1000, 1000))
        found = list(page.jobs)
        token = page.next_page_token
        while token and (not limit or len(found) < limit):
            more = await jobs.list_dead_letters(queue, page_size=1000, page_token=token)
            found.extend(more.jobs)
            token = more.next_page_token
        shown = found[:limit] if limit else found
        if json:
            output.emit({"queue": queue, "total": page.total, "jobs": shown})
        else:
            print("\n".join(format_dead(shown, page.total, queue, now)))
        return output.OK

    return run(_with_mesh(work))


@jobs_group.command("requeue")
@click.argument("queue")
@click.argument("job_ids", nargs=-1, metavar="[JOB_ID]...")
def requeue(queue: str, job_ids: tuple[str, ...]) -> int:
    """Make dead jobs ready again with fresh attempts (every dead job of the queue
    without JOB_IDs)."""
    async def work(mesh: Mesh, json: bool, now: float) -> int:
        requeued, remaining = 0, 0
        while True:
            result = await mesh.scheduler.requeue_dead_letters(queue, list(job_ids) or None)
            requeued += result.requeued
            remaining = result.remaining
            if job_ids or not remaining or not result.requeued:
                break
        if json:
            output.emit({"queue": queue, "requeued": requeued, "remaining": remaining})
        else:
            print(f"requeued {requeued} job(s) in {queue!r}; {remaining} still dead")
        return output.OK

    return run(_with_mesh(work))


@jobs_group.command("get")
@click.argument("job_id")
def get(job_id: str) -> int:
    """A job and its attempt history."""
    async def work(mesh: Mesh, json: bool, now: float) -> int:
        job = await mesh.scheduler.get_job(job_id)
        if json:
            output.emit(job)
        else:
            print("\n".join(format_job(job, now)))
        return output.OK

    return run(_with_mesh(work))
