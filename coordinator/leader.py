"""The leader's work for one term: follow membership, reconcile, write the map.

A round runs on every membership change and every ``reconcile_interval``:
gather facts (registered nodes, GetPosition where the step needs it), run the
pure step (coordinator.reconcile), write the result if it differs. Admin calls
that change the map (Drain, Rebalance) go through `update`, under the same lock,
so map writes never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aetcd

from common.membership import Membership, NodeInfo
from coordinator.config import CoordinatorConfig
from coordinator.election import Leadership
from coordinator.mapstore import Deposed, MapConflict, MapStore
from coordinator.positions import PositionProbe
from coordinator.reconcile import Facts, initial_map, needed_positions, next_map, restarted_nodes
from mesh.admin.v1 import admin_pb2

log = logging.getLogger(__name__)

MapChange = Callable[[admin_pb2.ClusterMap | None], admin_pb2.ClusterMap | None]


class LeaderDriver:
    """Reconciles the map for as long as ``run()`` runs (one leadership term)."""

    def __init__(self, etcd: aetcd.Client, config: CoordinatorConfig, term: Leadership,
                 probe: PositionProbe) -> None:
        self._config = config
        self._term = term
        self._probe = probe
        self._store = MapStore(etcd, config.cluster, term.create_revision)
        self._directory = Membership(etcd, config.cluster)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._seen: dict[str, float] = {}
        self._settle_until: float | None = None
        self._idle_inputs: tuple[int, dict[str, NodeInfo]] | None = None
        self._last_error = ("", 0.0)
        self.ready = asyncio.Event()
        """Set once membership and the map have been read."""

    @property
    def current(self) -> admin_pb2.ClusterMap | None:
        """The map as last read or written by this term."""
        return self._store.current

    async def run(self) -> None:
        try:
            await self._retry(self._directory.start)
            self._directory.on_change(self._wake.set)
            await self._retry(self._store.load)
            self.ready.set()
            while True:
                await self.reconcile_once()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancel that lands as the event is set, and this loop would go on.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._config.reconcile_interval):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            async with self._changed:
                self._changed.notify_all()  # waiters see the term is over
            await self._directory.close()

    async def reconcile_once(self) -> None:
        try:
            async with self._lock:
                await self._round()
        except Deposed:
            raise
        except MapConflict as exc:
            log.warning("%s; reading the map again", exc)
            with contextlib.suppress(Exception):
                await self._store.load()
        except Exception as exc:
            self._warn(f"reconcile round failed: {exc!r}")

    async def update(self, change: MapChange) -> admin_pb2.ClusterMap | None:
        """Apply ``change`` to the current map and write the result (None: no change)."""
        async with self._lock:
            for attempt in range(2):
                new = change(self._store.current)
                if new is None:
                    return None
                try:
                    await self._write(new)
                    return new
                except MapConflict:
                    if attempt:
                        raise
                    await self._store.load()
        return None

    async def wait_for(self, predicate: Callable[[admin_pb2.ClusterMap], bool],
                       timeout: float) -> bool:
        """Wait until the map satisfies ``predicate``; False on timeout or lost leadership."""
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self._term.lost.is_set() or (
                    self._store.current is not None and predicate(self._store.current)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait(), timeout)
        # holds(): the term's own deadline too, not only `lost` (set a moment later).
        return (self._term.holds(time.monotonic()) and self._store.current is not None
                and predicate(self._store.current))

    async def _round(self) -> None:
        registered = dict(self._directory.nodes)
        current = self._store.current
        if current is None:
            await self._create(registered)
            return
        restarted = restarted_nodes(current, registered, self._seen)
        need = needed_positions(current, registered, restarted)
        # The step is deterministic: with no facts to gather and the same inputs
        # as a round that changed nothing, it would change nothing again.
        inputs = (self._store.revision, registered)
        if not need and not restarted and inputs == self._idle_inputs:
            return
        addresses = {n: info.peer_address or info.address for n, info in registered.items()}
        positions, absent = await self._probe.gather(need, addresses)
        # In a thread: placing thousands of groups takes seconds of CPU (4096
        # groups: 1-2 s for a node joining a few), and on the event loop it kept
        # the leadership lease from being renewed, so the coordinator resigned
        # in the middle of every such round. The loop still gets its turns (the
        # GIL changes hands every few milliseconds); ``current`` is only read.
        new = await asyncio.to_thread(next_map, current, registered,
                                      Facts(positions, absent, restarted),
                                      self._config.replicas)
        if new is not None:
            await self._write(new)
        self._idle_inputs = None if new is not None or need else inputs
        self._seen = {n: info.started_at for n, info in registered.items()}
        await self._probe.retain(addresses.values())

    async def _create(self, registered: dict[str, NodeInfo]) -> None:
        if len(registered) < self._config.min_nodes:
            self._settle_until = None
            return
        # Let nodes started together all register, so the first map is balanced.
        now = time.monotonic()
        if self._settle_until is None:
            self._settle_until = now + self._config.settle
        if now < self._settle_until:
            return
        nodes = dict(self._directory.nodes)
        cmap = initial_map(nodes, self._config.groups, self._config.replicas)
        await self._write(cmap)
        log.info("created the cluster map: %d groups on %d nodes, %d replicas each",
                 len(cmap.groups), len(cmap.nodes), self._config.replicas)

    async def _write(self, cmap: admin_pb2.ClusterMap) -> None:
        try:
            await self._store.write(cmap)
        except Deposed:
            log.warning("deposed: etcd refused the map write")
            self._term.lost.set()
            raise
        log.info("map epoch %d written", cmap.epoch)
        async with self._changed:
            self._changed.notify_all()

    async def _retry(self, step: Callable[[], Awaitable[object]]) -> None:
        delay = 0.1
        while True:
            try:
                await asyncio.wait_for(step(), 3.0)
                return
            except Exception as exc:
                self._warn(f"leader start-up step failed: {exc!r}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _warn(self, message: str) -> None:
        # The same failure repeats every round while etcd or a node is away.
        last, when = self._last_error
        now = time.monotonic()
        if message != last or now - when > 10:
            log.warning(message)
            self._last_error = (message, now)
