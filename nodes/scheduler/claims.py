"""Claim's choice of jobs, and Claim calls waiting for some (long poll).

`pick` takes ready jobs from any set of queues (of one or several groups led
here) in the contract's order: higher priority, then earlier run time, then
enqueue order. `claim` leases them with one command per group.

A waiting Claim is an open call on the primary, not replicated state (as lock
waiters are): it registers with the `Leader` of each group it waits on and is
served, in arrival order, as soon as jobs become ready there. A failover ends
it with UNAVAILABLE and the worker claims again at the new primary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nodes.scheduler.model import Job
from nodes.scheduler.queues import Queue

if TYPE_CHECKING:
    from nodes.scheduler.leader import Leader
    from nodes.scheduler.machine import SchedulerMachine

__all__ = ["ClaimWaiter", "Claimed", "Room", "claim", "pick"]

Source = tuple["SchedulerMachine", Queue]

_JOB_BYTES = 128
"""Bytes a claimed job takes in an answer besides its payload and names, at most."""


class Room:
    """Bytes of claimed jobs one answer may still carry (a Claim's, or a batch's,
    shared by its items), so that it fits in a message: large payloads would
    otherwise make an answer the node cannot send, after leasing its jobs. The
    first job always fits, so a claim never stays empty for want of room,
    unless ``strict``: the room a forwarded share of a batch is given, which
    must hold with the forwarder's own answer in one message."""

    __slots__ = ("left", "taken")

    def __init__(self, size: int, *, strict: bool = False) -> None:
        self.left = size
        self.taken = strict  # (as if a job were taken: the next must fit)

    def fits(self, job: Job) -> bool:
        """Whether ``job`` fits; if it does, its bytes are taken."""
        size = len(job.payload) + 4 * (len(job.job_id) + len(job.queue) + len(job.type)) \
            + _JOB_BYTES  # (4: a character's UTF-8 bytes at most)
        if size > self.left and self.taken:
            return False
        self.left -= size
        self.taken = True
        return True


@dataclass(frozen=True, slots=True)
class Claimed:
    """Jobs leased by one command of one group, to answer once ``seq`` commits."""

    machine: SchedulerMachine
    seq: int
    jobs: list[Job]
    token: int


def pick(sources: Sequence[Source], max_jobs: int, now: int, room: Room
         ) -> dict[SchedulerMachine, list[Job]]:
    """Take up to ``max_jobs`` ready jobs out of the queues' indexes, best first,
    while they fit in ``room``."""
    for _, queue in sources:
        if queue.delayed:
            queue.promote(now)
    picked: dict[SchedulerMachine, list[Job]] = {}
    count = 0
    while count < max_jobs:
        best: tuple[tuple[int, int, int], Job, Source] | None = None
        for source in sources:
            top = source[1].peek_ready()
            if top is not None and (best is None or top[0] < best[0]):
                best = (top[0], top[1], source)
        if best is None:
            break
        _, job, (machine, queue) = best
        if not room.fits(job):
            break
        queue.take(job)
        picked.setdefault(machine, []).append(job)
        count += 1
    return picked


def claim(sources: Sequence[Source], worker_id: str, max_jobs: int, lease_ns: int, now: int,
          room: Room) -> list[Claimed]:
    """Lease up to ``max_jobs`` ready jobs to ``worker_id``, as many as fit in ``room``."""
    picked = pick(sources, max_jobs, now, room)
    return [machine.decisions.lease(jobs, worker_id, lease_ns)
            for machine, jobs in picked.items()]


@dataclass(eq=False)
class ClaimWaiter:
    """One Claim call waiting for jobs."""

    worker_id: str
    max_jobs: int
    lease_ns: int
    room: Room
    future: asyncio.Future[list[Claimed]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    places: list[tuple[Leader, list[str]]] = field(default_factory=list)
    """Where it is registered: each group's leader, with its queues there."""

    @property
    def done(self) -> bool:
        return self.future.done()

    def grant(self, claimed: list[Claimed]) -> None:
        self.leave()
        if not self.future.done():
            self.future.set_result(claimed)

    def fail(self, error: BaseException) -> None:
        self.leave()
        if not self.future.done():
            self.future.set_exception(error)

    def leave(self) -> None:
        """Unregister from every leader."""
        places, self.places = self.places, []
        for leader, queues in places:
            leader.remove_waiter(self, queues)
