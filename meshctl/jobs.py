"""``meshctl jobs``: look at job queues and their dead letters, and requeue them.

    meshctl jobs stats QUEUE...            jobs by state, lifetime counters, queue latency
    meshctl jobs dead QUEUE [--limit N]    dead jobs: id, type, attempts, when, last error
    meshctl jobs requeue QUEUE [JOB_ID...] make dead jobs ready again (all without ids)
    meshctl jobs get JOB_ID                a job and its attempt history
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from clients import Job, Mesh, QueueStats

Command = Callable[..., argparse.ArgumentParser]


def add_parser(sub: Any, command: Command) -> None:
    """Add ``jobs`` and its subcommands (``command(parent, name, help)`` makes one)."""
    jobs = command(sub, "jobs", "job scheduler: queue stats, dead letters, requeue")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    stats = command(jsub, "stats", "a queue's jobs by state and its counters")
    stats.add_argument("queues", nargs="+", metavar="QUEUE")
    dead = command(jsub, "dead", "list a queue's dead jobs, oldest death first")
    dead.add_argument("queue")
    dead.add_argument("--limit", type=int, default=50, help="most jobs to show (0: all)")
    requeue = command(jsub, "requeue", "make dead jobs ready again with fresh attempts")
    requeue.add_argument("queue")
    requeue.add_argument("job_ids", nargs="*", metavar="JOB_ID",
                         help="the jobs to requeue (default: every dead job of the queue)")
    get = command(jsub, "get", "a job and its attempts")
    get.add_argument("job_id")


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


async def run(args: argparse.Namespace, mesh: Mesh) -> int:
    jobs = mesh.scheduler
    now = time.time()
    if args.jobs_command == "stats":
        for queue in args.queues:
            for line in format_stats(await jobs.stats(queue), now):
                print(line)
    elif args.jobs_command == "dead":
        page = await jobs.list_dead_letters(args.queue, page_size=min(args.limit or 1000, 1000))
        found = list(page.jobs)
        token = page.next_page_token
        while token and (not args.limit or len(found) < args.limit):
            more = await jobs.list_dead_letters(args.queue, page_size=1000, page_token=token)
            found.extend(more.jobs)
            token = more.next_page_token
        shown = found[: args.limit] if args.limit else found
        for line in format_dead(shown, page.total, args.queue, now):
            print(line)
    elif args.jobs_command == "requeue":
        requeued, remaining = 0, 0
        while True:
            result = await jobs.requeue_dead_letters(args.queue, args.job_ids or None)
            requeued += result.requeued
            remaining = result.remaining
            if args.job_ids or not remaining or not result.requeued:
                break
        print(f"requeued {requeued} job(s) in {args.queue!r}; {remaining} still dead")
    elif args.jobs_command == "get":
        for line in format_job(await jobs.get_job(args.job_id), now):
            print(line)
    return 0
