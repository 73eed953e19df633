"""``run`` and ``serve``: ``asyncio.run`` for the benchmark's processes.

Two loops, as in a deployment: the servers (Mesh's nodes, and the baselines'
own Python servers: the echo server, the floors' relays, the ASGI floor) run
on the loop Mesh's server processes choose, ``MESH_EVENT_LOOP`` or by default
uvloop where installed (`common.event_loop`); the clients (this process, with
every side's client library in it, and the worker pool) run on asyncio's own
loop, as a program does unless it picks another. So both sides of a ratio
share their client's loop, and a Python baseline server runs on the same loop
as Mesh's.

The benchmark runs many event loops one after the other. A grpc.aio channel that
outlives its loop (closed, but not yet freed: clients sit in reference cycles)
keeps gRPC's poller bound to that loop, and a late event for one of its calls
then fails in the next loop ("Event loop is closed"). Collecting right after
each loop frees such channels, so gRPC shuts its poller down between loops.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

from common import event_loop

T = TypeVar("T")

SERVER_LOOP = event_loop.chosen(event_loop.from_environment())
"""The loop of the benchmark's server processes (Mesh's nodes read the same variable)."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` for a client-side step, then a garbage collection."""
    try:
        return asyncio.run(coro)
    finally:
        gc.collect()


def serve(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` of a baseline's server process, on `SERVER_LOOP`."""
    return event_loop.run(coro, SERVER_LOOP)
