"""A watchdog for one long-lived stream: cancel its call when it has been silent too long.

A node that is paused, or cut off with its TCP connection still open, sends
nothing and closes nothing: the stream would wait forever. The nodes send a
heartbeat on idle streams and say how often in the stream's first message;
the reader then arms the watchdog with a few of those intervals. Until
then it holds the stream to a first-message deadline (a node that never
confirms is as dead as a silent one), and with 0 it never fires, so a node
that sends no heartbeats cannot make the client drop a healthy, quiet stream.

Only time spent waiting for the network counts: while the reader is busy with
a message (e.g. blocked on a full buffer because its consumer is slow) the
stream is not to blame. Nor is it when the event loop itself was held up (the
timer fired late): then the stream gets a fresh window, since its messages may
be sitting unread. Firing cancels the call; the reader's pending read then
raises ``asyncio.CancelledError`` with its own task not cancelled, and
``stalled`` tells it why.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Watchdog", "cancelled_under_us"]

WATCHDOG_SLACK = 3
"""A timer later than silence / this is the loop's delay, not the stream's."""


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


def cancelled_under_us() -> bool:
    """In an ``except asyncio.CancelledError``: True when the current task was not
    cancelled itself, i.e. its gRPC call was (its channel closed, or a watchdog)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class Watchdog:
    """Cancels ``call`` once it has been waited on for ``silence`` seconds without a message."""

    def __init__(self, call: _Cancellable, silence: float) -> None:
        self._call = call
        self._loop = asyncio.get_running_loop()
        self.silence = 0.0
        self.stalled = False
        """Set when the watchdog cancelled the call."""
        self._since: float | None = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.arm(silence)

    def arm(self, silence: float) -> None:
        """From now on, expect a message at least every ``silence`` seconds (0: never fire)."""
        self.silence = silence
        if self._since is not None:
            self._since = self._loop.time()
        self._schedule(silence)

    def reason(self) -> str:
        """Why a stream it cancelled ended, for the error the caller sees."""
        return f"nothing heard for {self.silence:.1f} s: the node is silent (paused, or cut off)"

    def waiting(self) -> None:
        """The reader starts waiting for the next message."""
        self._since = self._loop.time()

    def busy(self) -> None:
        """The reader got a message and handles it (time no longer counts)."""
        self._since = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, delay: float) -> None:
        self.stop()
        if self.silence > 0:
            self._due = self._loop.time() + max(delay, 0.0)
            self._timer = self._loop.call_at(self._due, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.silence <= 0 or self.stalled:
            return
        now = self._loop.time()
        if now - self._due > self.silence / WATCHDOG_SLACK:
            # The loop was held up: messages may be waiting unread. A fresh window.
            if self._since is not None:
                self._since = now
        elif self._since is not None and now - self._since >= self.silence:
            self.stalled = True
            self._call.cancel()
            return
        start = self._since if self._since is not None else now
        self._schedule(start + self.silence - now)
