"""Ending a background task (cancel it, then wait until it has ended), and awaiting
several at once without leaving any running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any

CANCEL_AGAIN = 0.2
"""Seconds `cancel` waits for the task to end before cancelling it again."""


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None: there is none) and wait for it to end, so nothing it
    does can happen after this returns; raises the error it ended with, if any.

    A cancel can be lost on the way: on Python 3.11 `asyncio.wait_for` returns the
    result of a call that completes as the cancel arrives, and the task goes on
    (a node's lease renewal loop did, and its shutdown waited for it forever). So
    the task is cancelled again until it has ended.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN)
    if not task.cancelled():
        task.result()


async def together(awaitables: Iterable[Awaitable[Any]]) -> None:
    """Await ``awaitables`` at once; the first failure is raised once every one has
    ended, so nothing started for the caller is still running when it hears of
    it. One (or none) is simply awaited: no task."""
    pending = list(awaitables)
    if len(pending) <= 1:
        for one in pending:
            await one
        return
    for outcome in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
