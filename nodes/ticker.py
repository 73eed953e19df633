"""One background loop for every service's periodic work on the groups this node leads.

Some changes are not asked for by any request: expired cache keys leave,
events hidden by retention are scavenged, finished jobs past retention go. Each
is a replicated command like any write, proposed by the primary now and then.
Rather than one loop per service, each walking the groups, the node runs this
one: it calls `Service.tick` for every writable group when the service is
due, at least every ``tick_interval_ns`` and sooner if a tick asks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.clock import MILLISECOND, Clock
from common.tasks import cancel

if TYPE_CHECKING:
    from nodes.plugin import Service
    from nodes.replication.manager import Replication

__all__ = ["Ticker"]

log = logging.getLogger(__name__)

MIN_DELAY = 5 * MILLISECOND
"""The loop never comes back sooner than this, unless a tick says it is busy
(returns the ``now_ns`` it was given)."""


class Ticker:
    """Runs the due services' ticks on the writable groups, then sleeps until the next."""

    def __init__(self, services: Sequence[Service], replication: Replication,
                 clock: Clock) -> None:
        self._services = [s for s in services if s.tick_interval_ns > 0]
        self._replication = replication
        self._clock = clock
        self._due = {id(s): 0 for s in self._services}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._services:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ticker")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None

    def tick(self, now: int) -> int:
        """Tick the services due at ``now``; when the next one is due."""
        groups = [g for g in self._replication.groups.values() if g.writable]
        for service in self._services:
            if self._due[id(service)] > now:
                continue
            due = now + service.tick_interval_ns
            for group in groups:
                if not group.writable:  # a tick may have proposed, and lost, meanwhile
                    continue
                try:
                    wanted = service.tick(group, now)
                except Exception:
                    log.exception("group %d: %s's periodic work failed", group.group_id,
                                  service.name)
                    continue
                if wanted is not None and wanted < due:
                    # ``now`` says "busy: come back at once"; any other instant
                    # waits MIN_DELAY at least (a past one is no reason to spin).
                    due = wanted if wanted == now else max(wanted, now + MIN_DELAY)
            self._due[id(service)] = due
        return min(self._due.values())

    async def _run(self) -> None:
        clock = self._clock
        while True:
            now = clock.wall_ns()
            due = self.tick(now)
            if due <= now:  # a service has more to do at once: let requests in first
                await asyncio.sleep(0)
                continue
            await clock.sleep(max(due - now, MIN_DELAY))
