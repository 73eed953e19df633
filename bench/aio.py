"""``run``: ``asyncio.run`` for a benchmark step, leaving no gRPC state behind.

Every process of the benchmark (its own, the baselines' servers, the floors'
relays, the worker pool) runs on the event loop Mesh's servers choose by
default (`common.event_loop`: uvloop where installed), so each side of a ratio
runs on the same loop.

The benchmark runs many event loops one after the other. A grpc.aio channel that
outlives its loop (closed, but not yet freed: clients sit in reference cycles)
keeps gRPC's poller bound to that loop, and a late event for one of its calls
then fails in the next loop ("Event loop is closed"). Collecting right after
each loop frees such channels, so gRPC shuts its poller down between loops.
"""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

from common import event_loop

T = TypeVar("T")

LOOP = event_loop.chosen("auto")
"""The event loop every benchmark process runs on."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` (on `LOOP`), then a garbage collection."""
    try:
        return event_loop.run(coro, LOOP)
    finally:
        gc.collect()
