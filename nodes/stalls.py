"""Telling the coordinator which replicas stopped answering this node.

A primary waits for every in-sync replica's acknowledgement before it answers a
write. A replica that stops answering while both nodes keep their etcd leases
(the link between the two cut, its disk hung) so stops the writes of every group
it holds for this node, and nothing in the map would ever change: membership
says both are fine. `Stalls` looks at this node's links every `INTERVAL`; a
node that has owed an answer for ``threshold`` seconds goes into this node's
registration (`NodeInfo.stalled`), and the coordinator seats another replica in
its place in the groups this node leads. The groups take no write
until the new copy is in sync: an acknowledged write is always held by as many
copies as the map names (dropping the silent replica at once, as Kafka shrinks
its ISR, would acknowledge writes held by one node).

Every node keeps a link to every other node of the map, and an idle link
heartbeats, so a node is reported by every node it stopped answering, whether
or not it holds a copy of a group they lead. Two reports make the fault the
reported node's own (`coordinator.reconcile.cut_off_primaries`): the groups it
leads fail over even though it keeps its etcd lease.

A node stays reported until its link answers again, it leaves the map or
restarts (a new process, whatever is wrong with the old one), or for ``hold``
seconds (three thresholds) after its link last showed it silent, should the
link go away meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from common.tasks import cancel

log = logging.getLogger(__name__)

INTERVAL = 1.0
"""Seconds between looks at the links."""
HOLD = 3
"""A replica stays reported this many stall thresholds after its link last
showed it silent."""


class Link(Protocol):
    """What `Stalls` reads of a `PeerLink`."""

    answered_at: float

    def unanswered_for(self, now: float) -> float: ...


class Stalls:
    """Which replicas of this node stopped answering it, kept published."""

    def __init__(self, links: Callable[[], Mapping[str, Link]],
                 incarnations: Callable[[], Mapping[str, str]],
                 publish: Callable[[tuple[str, ...]], Awaitable[bool]], threshold: float,
                 hold: float | None = None, interval: float = INTERVAL) -> None:
        """``links``: node id -> link to it, now; ``incarnations``: node id -> its
        process's incarnation, for the nodes in the map now. ``publish`` writes
        the stalled set (True once written). ``threshold``: seconds of silence
        that count; ``hold``: see the module (default `HOLD` thresholds)."""
        self._links = links
        self._incarnations = incarnations
        self._publish = publish
        self._threshold = threshold
        self._hold = HOLD * threshold if hold is None else hold
        self._interval = interval
        # node -> (when its link last was silent too long, its incarnation then)
        self._seen: dict[str, tuple[float, str]] = {}
        self._last: float | None = None
        self._published: tuple[str, ...] | None = ()
        """What the registration is known to hold (None: not known)."""
        self.reported: tuple[str, ...] = ()
        """The nodes the last look found silent (or still held)."""
        self._task: asyncio.Task[None] | None = None

    def check(self, now: float) -> tuple[str, ...]:
        """The nodes to report at loop time ``now``."""
        links = self._links()
        incarnations = self._incarnations()
        # After a gap much longer than the interval this process did not run
        # (paused, its loop blocked): the acks that came meanwhile are not read
        # yet, so silence says nothing this time.
        awake = self._last is not None and now - self._last <= 3 * self._interval
        self._last = now
        if awake:
            for node_id, link in links.items():
                if node_id in incarnations and link.unanswered_for(now) >= self._threshold:
                    if node_id not in self._seen:
                        log.warning("replica %s has answered nothing for %.1f s: asking the "
                                    "coordinator to replace it in the groups this node "
                                    "leads", node_id, link.unanswered_for(now))
                    self._seen[node_id] = (now, incarnations[node_id])
        for node_id, (seen, incarnation) in list(self._seen.items()):
            back = links.get(node_id)
            if (back is not None and back.answered_at > seen) or now - seen > self._hold \
                    or incarnations.get(node_id) != incarnation:
                del self._seen[node_id]
                log.info("replica %s is no longer reported as stalled", node_id)
        self.reported = tuple(sorted(self._seen))
        return self.reported

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stalls")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            stalled = self.check(loop.time())
            if stalled == self._published:
                continue
            # A write that failed may still have landed (etcd answered after the
            # deadline), and one refused for a lost registration is what the
            # next registration writes: either way what the registration holds
            # is not known, so the next round writes the set again even if it
            # is back to what was last known. (Comparing with the old set left
            # a replica reported for ever once it had answered again.)
            self._published = None
            try:
                if await self._publish(stalled):
                    self._published = stalled
            except Exception as exc:  # etcd away: the next round tries again
                log.warning("could not publish stalled replicas %s: %r", list(stalled), exc)
