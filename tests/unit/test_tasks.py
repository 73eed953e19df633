"""`common.tasks.cancel`: a background task ends, even one that lost a cancel."""

from __future__ import annotations

import asyncio

import pytest

from common.tasks import cancel

pytestmark = pytest.mark.timeout(10)


async def test_a_task_that_swallowed_a_cancel_is_cancelled_again_until_it_ends() -> None:
    """What Python 3.11's wait_for does when the call it waits for completes as
    the cancel arrives: the result is returned and the cancel is gone. A lease
    renewal loop did that, and a node's shutdown waited for it forever."""
    swallowed = 0

    async def renewing() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed == 0:
                    swallowed += 1
                    continue  # lost: the loop goes on
                raise

    task = asyncio.create_task(renewing())
    await asyncio.sleep(0.02)
    ending = asyncio.create_task(cancel(task))
    try:
        done, _ = await asyncio.wait({ending}, timeout=3)
        assert ending in done, "cancel() waits for a task that lost its cancel"
        assert task.cancelled() and swallowed == 1
    finally:
        task.cancel()
        ending.cancel()
        await asyncio.wait({task, ending})


async def test_cancel_raises_what_the_task_ended_with_and_takes_none() -> None:
    async def failing() -> None:
        raise ValueError("its own error")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(ValueError):
        await cancel(task)
    await cancel(None)
