"""Long-lived streams deliver, resume or fail loudly: they never stall silently.

Against real node processes (3 nodes, R = 1, 2 s leases):

- the client closes a node's channel under an open ``$all`` subscription (what
  it does when a node leaves the map; the stream then ends with CancelledError,
  which used to drop that node's slots for good), and a node is drained away
  (SIGTERM) while events are appended on every node: every event arrives
  exactly once, in order per stream, and every slot keeps a running part;
- a node is paused (SIGSTOP: its connections stay open and silent): the
  subscription and a cache watch notice within 3 heartbeat intervals, resume
  on the new primaries after the failover, and lose nothing (the watch reports
  the possible gap and then follows the new primary).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from clients import CacheEvent, Mesh, MeshError, NewEvent, RecordedEvent, WatchGapError
from clients.event_subscription import ALL_SLOTS, SERVICE, Subscription
from common.slots import slot_for
from tests.test_events_client import _streams_on_every_node

Connect = Callable[..., Awaitable[Mesh]]
LEASE_TTL = 2
HEARTBEAT = 0.3
"""The nodes' heartbeat interval in the stall test (the client's watchdog: 3 of them)."""


class Appender:
    """Appends one event to each stream per round until stopped; an append that
    fails is retried with the same event (so the same id), hence never doubled."""

    def __init__(self, mesh: Mesh, streams: list[str]) -> None:
        self.mesh = mesh
        self.streams = streams
        self.last = dict.fromkeys(streams, 0)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _append(self, stream: str, round_: int) -> None:
        event = NewEvent("Tick", {"round": round_})
        while True:
            try:
                self.last[stream] = (await self.mesh.events.append(stream, event)).last_version
                return
            except MeshError:
                await asyncio.sleep(0.1)

    async def _run(self) -> None:
        round_ = 0
        while not self._stop.is_set():
            round_ += 1
            await asyncio.gather(*(self._append(s, round_) for s in self.streams))
            await asyncio.sleep(0.02)


class Collector:
    """Takes every event of a subscription in the background."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.events: list[RecordedEvent] = []
        self.changed = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for item in self.sub:
            if isinstance(item, RecordedEvent):
                self.events.append(item)
                self.changed.set()

    def versions(self, stream: str) -> list[int]:
        return [e.version for e in self.events if e.stream == stream]

    async def wait_for(self, last: dict[str, int], timeout: float) -> float:
        """Seconds until every stream's events up to ``last`` arrived."""
        started = time.monotonic()

        async def complete() -> None:
            while any(self.versions(s)[-1:] < [v] for s, v in last.items() if v):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(complete(), timeout)
        return time.monotonic() - started

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _check_exactly_once(collector: Collector, last: dict[str, int]) -> None:
    for stream, version in last.items():
        assert collector.versions(stream) == list(range(1, version + 1)), stream


def _every_slot_has_a_part(mesh: Mesh, sub: Subscription) -> bool:
    """Every slot is in exactly one running part, on its primary per the map."""
    covered: list[int] = []
    for address, slots in sub.parts:
        covered.extend(slots)
        if {mesh.route_slot(SERVICE, s).address for s in slots} != {address}:
            return False
    return len(covered) == len(ALL_SLOTS) and set(covered) == ALL_SLOTS


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.05)


def _primary_address(mesh: Mesh, stream: str) -> str:
    return mesh.route_slot(SERVICE, slot_for(stream)).address


async def test_all_subscription_survives_its_channel_closing_and_a_node_leaving(
    local_mesh: Any, mesh_client: Connect
) -> None:
    local = local_mesh(3, lease_ttl=LEASE_TTL)
    mesh = await mesh_client(timeout=5)
    streams = _streams_on_every_node(mesh, "live-", per_node=2)
    appender = Appender(mesh, streams)
    async with mesh.events.subscribe(all=True) as sub:
        collector = Collector(sub)
        appender.start()
        await asyncio.sleep(0.5)

        # 1. The client's own retire path closes a node's channel under its open
        #    stream (no delay, no waiting for the stream to move).
        closed = _primary_address(mesh, streams[0])
        retiring = mesh._retire_channel(closed, delay=0, max_wait=0)
        assert retiring is not None
        await retiring
        await asyncio.sleep(1.0)
        snapshot = dict(appender.last)
        print(f"\nafter the channel closed: caught up in "
              f"{await collector.wait_for(snapshot, 10):.2f} s")

        # 2. A node leaves the map (SIGTERM: it drains): its slots' parts move.
        leaving = next(n for n in local.nodes if n.address != closed)
        leaving.child.terminate()
        await asyncio.sleep(LEASE_TTL + 2.0)
        await appender.stop()
        waited = await collector.wait_for(appender.last, 10)
        print(f"after a node left: every event delivered {waited:.2f} s after the last append")
        _check_exactly_once(collector, appender.last)
        assert sum(appender.last.values()) > 10 * len(streams)
        await _until(lambda: _every_slot_has_a_part(mesh, sub), 5, "a part for every slot")
        assert all(address != leaving.address for address, _ in sub.parts)
        await collector.stop()


async def test_a_paused_node_is_noticed_by_heartbeats_and_streams_resume(
    local_mesh: Any, mesh_client: Connect
) -> None:
    local = local_mesh(3, lease_ttl=LEASE_TTL,
                       extra=["--stream-heartbeat-interval", str(HEARTBEAT)])
    mesh = await mesh_client(timeout=5)
    table = mesh.table
    assert table is not None
    victim = next(n for n in local.nodes if any(g.primary == n.node_id
                                                for g in table.groups.values()))
    streams = _streams_on_every_node(mesh, "stall-", per_node=1)
    key = table.key_led_by(victim.node_id, "stall-key")
    appender = Appender(mesh, streams)
    changes: list[CacheEvent] = []
    gaps: list[WatchGapError] = []

    async def follow(watch: Any) -> None:
        while True:
            try:
                async for change in watch:
                    changes.append(change)
            except WatchGapError as gap:
                gaps.append(gap)

    async with mesh.events.subscribe(all=True) as sub, \
            mesh.cache.watch(keys=[key], prefixes=["stall-p:"]) as watch:
        collector = Collector(sub)
        following = asyncio.create_task(follow(watch))
        appender.start()
        await mesh.cache.set(key, b"before")
        await asyncio.sleep(1.0)  # some heartbeats on the idle watch

        victim.child.pause()
        stopped = time.monotonic()
        try:
            noticed: dict[str, float] = {}
            while len(noticed) < 2 and time.monotonic() - stopped < 10:
                for name, stalls in (("subscription", sub.stalls), ("watch", watch.stalls)):
                    if stalls and name not in noticed:
                        noticed[name] = time.monotonic() - stopped
                await asyncio.sleep(0.02)
            print("\nsilence noticed after: " + ", ".join(
                f"{name} {seconds:.2f} s" for name, seconds in noticed.items()))
            # A watchdog fires after 3 intervals of silence (0.9 s), before the node's
            # lease (2 s) could expire and the map move anything (the rest of the
            # lease is room for a loaded machine).
            assert set(noticed) == {"subscription", "watch"}
            assert max(noticed.values()) < LEASE_TTL

            # The failover: writes to the paused node's groups succeed again at the
            # new primary; the streams follow them there.
            while True:
                try:
                    await mesh.cache.set(key, b"after", timeout=1)
                    break
                except MeshError:
                    await asyncio.sleep(0.1)
            failed_over = time.monotonic() - stopped
            await asyncio.sleep(1.0)
            await appender.stop()
            waited = await collector.wait_for(appender.last, 10)
            print(f"failover after {failed_over:.2f} s; every event delivered "
                  f"{waited:.2f} s after the last append")
            _check_exactly_once(collector, appender.last)

            # The watch was opened again on the new primary and said changes may
            # have been missed; a change made there afterwards arrives, from it.
            await _until(lambda: bool(gaps), 10, "the watch's gap report")
            assert gaps[0].missed is None and watch.reopened >= 1
            assert victim.node_id not in watch.nodes
            await mesh.cache.set(key, b"again")
            await _until(lambda: any(c.key == key and c.value == b"again" for c in changes),
                         5, "the change at the new primary")
            [again] = [c for c in changes if c.value == b"again"]
            assert again.node != victim.node_id
            await _until(lambda: _every_slot_has_a_part(mesh, sub), 5, "a part for every slot")
        finally:
            victim.child.signal(signal.SIGCONT)
            following.cancel()
            await collector.stop()

