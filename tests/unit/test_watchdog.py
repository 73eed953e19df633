"""The stream watchdog (clients/watchdog.py) and the heartbeat interval rules
(common/heartbeat.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from google.protobuf import duration_pb2

from clients.watchdog import Watchdog, cancelled_under_us
from common import heartbeat as hb
from common.errors import MeshStatusError


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_fires_after_silence_while_the_reader_waits() -> None:
    call = FakeCall()
    dog = Watchdog(call, 0.1)
    await asyncio.sleep(0.2)
    assert call.cancelled and dog.stalled
    dog.stop()


async def test_disarmed_it_never_fires() -> None:
    """A node that promised no heartbeats (interval 0) is never taken for dead."""
    call = FakeCall()
    dog = Watchdog(call, 0.1)
    dog.arm(0.0)
    await asyncio.sleep(0.3)
    assert not call.cancelled and not dog.stalled


async def test_messages_keep_it_quiet() -> None:
    call = FakeCall()
    dog = Watchdog(call, 0.15)
    for _ in range(8):
        await asyncio.sleep(0.05)
        dog.busy()
        dog.waiting()
    assert not call.cancelled
    dog.stop()


async def test_a_busy_reader_is_not_blamed() -> None:
    """Time spent handling a message (e.g. blocked on a full buffer) does not count."""
    call = FakeCall()
    dog = Watchdog(call, 0.1)
    dog.busy()
    await asyncio.sleep(0.3)
    assert not call.cancelled
    dog.waiting()
    await asyncio.sleep(0.2)
    assert call.cancelled


async def test_a_held_up_loop_gives_a_fresh_window() -> None:
    """The timer firing late means the loop was blocked: messages may sit unread."""
    call = FakeCall()
    dog = Watchdog(call, 0.3)
    time.sleep(0.7)  # noqa: ASYNC251 - blocking the loop is the point
    await asyncio.sleep(0.05)
    assert not call.cancelled
    await asyncio.sleep(0.4)
    assert call.cancelled and dog.stalled


async def test_cancelled_under_us_tells_a_call_cancellation_from_a_task_cancellation() -> None:
    seen: list[bool] = []

    async def reader(waiter: asyncio.Future[None]) -> None:
        try:
            await waiter
        except asyncio.CancelledError:
            seen.append(cancelled_under_us())
            raise

    loop = asyncio.get_running_loop()
    # The awaited thing is cancelled (as a gRPC call whose channel closed).
    waiter: asyncio.Future[None] = loop.create_future()
    task = asyncio.create_task(reader(waiter))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # The task itself is cancelled (close()).
    task = asyncio.create_task(reader(loop.create_future()))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert seen == [True, False]


def test_heartbeat_interval_rules() -> None:
    second = duration_pb2.Duration(seconds=1)
    assert hb.interval("f", None, 5.0) == 5.0  # not asked: the node's setting
    assert hb.interval("f", duration_pb2.Duration(), 5.0) == 5.0  # zero: the same
    assert hb.interval("f", second, 0.0) == 0.0  # the node sends none, whatever asked
    assert hb.interval("f", duration_pb2.Duration(nanos=1000), 5.0) == hb.MIN_REQUESTED
    assert hb.interval("f", duration_pb2.Duration(seconds=10**6), 5.0) == hb.MAX_REQUESTED
    assert hb.interval("f", duration_pb2.Duration(seconds=7), 5.0) == 7.0
    with pytest.raises(MeshStatusError):
        hb.interval("f", duration_pb2.Duration(seconds=-1), 5.0)
    assert hb.as_duration(0.3).ToNanoseconds() == 300_000_000
