"""`PrefixFollower.close` ends the follower's loop, even when a cancel is lost."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aetcd
import pytest

from common.etcd import PrefixFollower


class _Unreachable:
    """An etcd client whose watch fails at once (the loop then reads again)."""

    async def connect(self) -> None:
        raise ConnectionError("etcd unreachable")


async def test_close_ends_the_loop_even_when_a_cancel_is_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    follower = PrefixFollower(cast(aetcd.Client, _Unreachable()), b"/p/",
                              lambda kvs: None, lambda *event: None)
    reading = asyncio.Event()
    reads = 0
    lost = 0

    async def read() -> int:
        nonlocal reads, lost
        reads += 1
        if reads == 1:
            return 0  # start()'s read
        reading.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            lost += 1
            if lost == 1:
                # As asyncio.wait_for does on Python 3.11 when the call it waits
                # for completes as the cancel arrives: the read returns, and the
                # loop goes on to watch again.
                return 0
            raise
        return 0

    monkeypatch.setattr(follower, "_read", read)
    await follower.start()
    await asyncio.wait_for(reading.wait(), 10)  # the loop is in a read
    closing = asyncio.create_task(follower.close())
    done, _ = await asyncio.wait({closing}, timeout=10)
    closing.cancel()
    assert closing in done, "close() waited on a loop that went on"
    assert lost >= 1  # the first cancel was lost; a later one ended the loop
    await follower.close()  # and again: nothing to do


async def test_close_before_start_does_nothing() -> None:
    follower = PrefixFollower(cast(aetcd.Client, cast(Any, _Unreachable())), b"/p/",
                              lambda kvs: None, lambda *event: None)
    await follower.close()
