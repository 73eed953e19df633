"""``run``: ``asyncio.run`` for a benchmark step, leaving no gRPC state behind.

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

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)``, then a garbage collection."""
    try:
        return asyncio.run(coro)
    finally:
        gc.collect()
