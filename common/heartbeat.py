"""Heartbeats on long-lived streams (event subscriptions, cache watches).

A node sends a heartbeat on a stream that has had nothing else to send for its
interval, so that a client can tell a quiet stream from a dead one (a paused
or cut-off node leaves the TCP connection open and silent). The interval is
the node's setting (``--stream-heartbeat-interval``; 0: no heartbeats) unless
the request asks for its own, which is bounded so that no caller can make a
node spin. The node tells the client the interval it uses in the stream's
first message; the client arms its watchdog only then, so a node that sends
none (older, or configured so) never makes the client drop healthy streams.
"""

from __future__ import annotations

import asyncio
import time

from google.protobuf import duration_pb2, timestamp_pb2

from common.bounds import duration_seconds

__all__ = ["DEFAULT_INTERVAL", "MAX_REQUESTED", "MIN_REQUESTED", "WATCHDOG_INTERVALS",
           "as_duration", "idle", "interval", "now"]

DEFAULT_INTERVAL = 5.0
"""The node's default interval, seconds."""
MIN_REQUESTED = 1.0
MAX_REQUESTED = 300.0
"""Bounds of an interval a request asks for, seconds."""
WATCHDOG_INTERVALS = 3
"""A client takes a stream for dead after this many intervals of silence."""


def interval(field: str, requested: duration_pb2.Duration | None, setting: float) -> float:
    """The interval of one stream, seconds (0: none): the node's ``setting`` unless
    the request gives a non-zero one (bounded); nothing at all if the setting is 0."""
    if setting <= 0:
        return 0.0
    asked = duration_seconds(field, requested) if requested is not None else 0.0
    if asked <= 0:
        return setting
    return min(max(asked, MIN_REQUESTED), MAX_REQUESTED)


def as_duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


async def idle(wake: asyncio.Event, heartbeat: float) -> bool:
    """Wait for ``wake``; False if ``heartbeat`` seconds pass first (time for a
    heartbeat). With ``heartbeat`` 0, wait as long as it takes."""
    if heartbeat <= 0:
        await wake.wait()
        return True
    try:
        async with asyncio.timeout(heartbeat):
            await wake.wait()
    except TimeoutError:
        return False
    return True
