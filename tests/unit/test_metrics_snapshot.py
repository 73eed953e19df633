"""The /metrics snapshot is summed up on the loop when a scrape asks, not on a timer."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from prometheus_client import generate_latest

from common import metrics as metrics_module
from common.metrics import Metrics, Snapshot, one

pytestmark = pytest.mark.timeout(20)


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    return text


async def test_a_snapshot_is_taken_per_scrape_at_most_once_per_interval() -> None:
    taken: list[float] = []

    def take() -> Snapshot:
        taken.append(time.monotonic())
        return Snapshot(gauges={"mesh_test_takes": ("snapshots taken", one(len(taken)))})

    metrics = Metrics(take, interval=60.0)
    address = metrics.serve("127.0.0.1:0")
    try:
        await asyncio.sleep(0.5)
        assert taken == []  # nobody scraped: nothing summed up
        first = await asyncio.to_thread(_scrape, address)
        assert "mesh_test_takes 1.0" in first and len(taken) == 1
        await asyncio.to_thread(_scrape, address)  # within the interval: the same one
        assert len(taken) == 1
        assert metrics._taken_at is not None
        metrics._taken_at -= 61.0  # the interval has passed (without waiting for it)
        later = await asyncio.to_thread(_scrape, address)
        assert "mesh_test_takes 2.0" in later and len(taken) == 2
    finally:
        await metrics.close()


async def test_a_scrape_of_a_stuck_loop_gets_the_last_snapshot_without_hanging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "SCRAPE_WAIT", 0.2)
    count = 0

    def take() -> Snapshot:
        nonlocal count
        count += 1
        return Snapshot(gauges={"mesh_test_takes": ("snapshots taken", one(count))})

    metrics = Metrics(take, interval=0.0)
    address = metrics.serve("127.0.0.1:0")
    try:
        assert "mesh_test_takes 1.0" in await asyncio.to_thread(_scrape, address)
        def timed_scrape() -> tuple[str, float]:
            return _scrape(address), time.monotonic()

        scrape = asyncio.get_running_loop().run_in_executor(None, timed_scrape)
        time.sleep(2.0)  # noqa: ASYNC251 (the loop stuck on purpose, as a bug would)
        unstuck = time.monotonic()
        text, answered = await scrape
        # It came back with the last snapshot while the loop was still stuck.
        assert answered < unstuck and "mesh_test_takes 1.0" in text
        assert count == 1  # and the take it asked for never ran late
    finally:
        await metrics.close()


async def test_a_collection_on_the_loop_itself_takes_the_snapshot_there() -> None:
    metrics = Metrics(lambda: Snapshot(gauges={"mesh_test_here": ("on the loop", one(1))}))
    address = metrics.serve("127.0.0.1:0")
    try:
        assert b"mesh_test_here 1.0" in generate_latest(metrics.registry)
        assert "mesh_test_here 1.0" in await asyncio.to_thread(_scrape, address)
    finally:
        await metrics.close()
