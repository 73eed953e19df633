"""A granted lease, and the local clock that decides when it must be presumed lost.

The primary expires a lease ``ttl`` after it received the Acquire or Refresh
that granted or extended it, on its own clock. The client cannot see that
clock, but it knows when it sent the request, which was earlier: so it
presumes the lease lost at (send time + ttl - margin), measured with
``time.monotonic``, unless a later Refresh succeeded. ``expire_time`` (the
primary's clock) is only reported, never relied on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import grpc

from clients.errors import LockLostError, LockNotHeldError, MeshError

log = logging.getLogger(__name__)

MAX_MARGIN = 1.0
"""The safety margin is a tenth of the ttl, at most this many seconds."""


def margin(ttl: float) -> float:
    """How long before its ttl runs out a lease is presumed lost (clock drift, scheduling)."""
    return min(ttl * 0.1, MAX_MARGIN)


def attempt_limit(ttl: float) -> float:
    """Longest one background refresh may take before it is given up and tried again
    (on a fresh route): a sixth of the ttl, so several tries fit in what is left."""
    return max(ttl / 6, 0.2)


def local_deadline(sent: float, ttl: float) -> float:
    """When a lease granted or refreshed by a request sent at ``sent`` (``time.monotonic``)
    must be presumed lost."""
    return sent + ttl - margin(ttl)


class _Client(Protocol):
    """What a lease needs from ``LockClient``."""

    async def refresh(
        self, lease: Lease, ttl: float | None = None, *, timeout: float | None = None
    ) -> None: ...

    async def release(self, lease: Lease, *, timeout: float | None = None) -> None: ...


LostCallback = Callable[["Lease"], object]


class Lease:
    """A granted lease on ``name``: ``token`` is its fencing token, ``ttl`` its time to
    live (seconds), ``expire_time`` when the primary expires it (Unix seconds, the
    primary's clock). ``lost`` is set, and ``lost_reason`` says why, the moment the
    lease is known or presumed lost; a lost lease stays lost.

    Created on the event loop that runs the client; ``held`` and ``check()`` may
    also be used from other threads (the blocking client).
    """

    def __init__(
        self, client: _Client, name: str, lease_id: str, token: int, ttl: float,
        permits: int, expire_time: float, sent: float,
    ) -> None:
        self._client = client
        self.name = name
        self.lease_id = lease_id
        self.token = token
        self.ttl = ttl
        self.permits = permits
        self.expire_time = expire_time
        self._lost: asyncio.Event | None = None
        self.lost_reason: str | None = None
        self.renewed_at = sent
        """When (``time.monotonic``) the last successful Acquire or Refresh was sent."""
        self.deadline = local_deadline(sent, ttl)
        """When (``time.monotonic``) the lease is presumed lost unless refreshed first."""
        self._released = False
        self._release_sent = False  # a Release may have applied (its outcome was unknown)
        self._callbacks: list[LostCallback] = []
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self.lost_reason else "held"
        return (f"Lease(name={self.name!r}, lease_id={self.lease_id!r}, token={self.token}, "
                f"ttl={self.ttl}, permits={self.permits}, {state})")

    @property
    def held(self) -> bool:
        """Not released and not lost (nor past its local deadline)."""
        return not self._released and not self._expired()

    @property
    def lost(self) -> asyncio.Event:
        """Set the moment the lease is lost. Made on first use, and only then is
        the deadline watched by a timer: a lease acquired and released with
        nobody watching needs none (``held`` and ``check()`` read the clock)."""
        if self._lost is None:
            self._lost = asyncio.Event()
            if self._expired():
                self._lost.set()
            elif not self._released:
                self._watch()
        return self._lost

    @property
    def released(self) -> bool:
        return self._released

    @property
    def remaining(self) -> float:
        """Seconds until the local deadline (negative once it passed)."""
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise LockLostError if the lease is lost (LockNotHeldError if it was released).
        Call it just before each write the lock protects, and pass ``token`` along."""
        if self._expired():
            raise LockLostError(
                f"lease {self.lease_id} of lock {self.name!r} was lost: {self.lost_reason}")
        if self._released:
            raise LockNotHeldError(
                f"lease {self.lease_id} of lock {self.name!r} was released",
                code=grpc.StatusCode.FAILED_PRECONDITION, reason="LOCK_NOT_HELD")

    def on_lost(self, callback: LostCallback) -> None:
        """Call ``callback(lease)`` on the client's event loop when the lease is lost
        (at once if it already is)."""
        self._callbacks.append(callback)
        if self.lost.is_set():
            self._run_callbacks([callback])

    async def refresh(self, ttl: float | None = None, *, timeout: float | None = None) -> None:
        """Extend the lease by ``ttl`` (default: its current ttl) from now.

        LockNotHeldError (and ``lost`` set) if the node no longer has it;
        LockLostError if it was already presumed lost.
        """
        await self._client.refresh(self, ttl, timeout=timeout)

    async def release(self, *, timeout: float | None = None) -> None:
        """Give the lease back; calling it again does nothing."""
        await self._client.release(self, timeout=timeout)

    # -- state changes, for the client ------------------------------------------

    def _expired(self) -> bool:
        """True if lost. The timer may not have run yet (a busy loop, another
        thread asking), so the deadline is checked here too."""
        if self.lost_reason is None and not self._released and time.monotonic() >= self.deadline:
            self._lose(f"no successful refresh within the ttl ({self.ttl:g}s) minus the "
                       f"safety margin ({margin(self.ttl):g}s)")
        return self.lost_reason is not None

    def _renewed(self, sent: float, ttl: float, expire_time: float) -> None:
        """A Refresh sent at ``sent`` succeeded. A lease presumed lost stays lost."""
        if self._expired() or self._released:
            return
        self.ttl = ttl
        self.expire_time = expire_time
        self.renewed_at = sent
        self.deadline = local_deadline(sent, ttl)
        if self._lost is not None:
            self._arm()

    def _lose(self, reason: str) -> None:
        if self.lost_reason is not None or self._released:
            return
        self.lost_reason = reason
        self._on_loop(self._signal)

    def _mark_released(self) -> None:
        self._released = True
        if self._timer is not None:
            self._timer.cancel()

    def _watch(self) -> None:
        """Arm the deadline's timer, from any thread."""
        self._on_loop(self._arm)

    def _on_loop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` now if this is the client's loop, else soon on that loop
        (``held``, ``check()`` and ``lost`` may be used from other threads)."""
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            callback()
        else:
            self._loop.call_soon_threadsafe(callback)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._released or self.lost_reason is not None:
            return  # nothing left to watch (it may have ended before a thread's _watch)
        self._timer = self._loop.call_later(max(0.0, self.remaining), self._expired)

    def _signal(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._lost is not None:
            self._lost.set()
        self._run_callbacks(self._callbacks)

    def _run_callbacks(self, callbacks: list[LostCallback]) -> None:
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("on_lost callback of lock %r failed", self.name)


async def keep_alive(lease: Lease) -> None:
    """Refresh ``lease`` every ttl/3 until it is released or lost.

    A failed refresh is tried again every margin until one succeeds or the local
    deadline passes (the lease is then lost); LOCK_NOT_HELD loses it at once.
    """
    due = lease.renewed_at + lease.ttl / 3
    while lease.held:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if not lease.held:
            return
        try:
            # Each try is short: one sent to a primary that just vanished (no
            # answer, no reset) must not use up the lease's remaining time, or
            # the lease is lost although the new primary, known a moment
            # later, holds it (failovers keep leases).
            await lease.refresh(timeout=max(min(lease.remaining, attempt_limit(lease.ttl)),
                                            0.001))
        except (LockNotHeldError, LockLostError):
            return  # the refresh marked the lease lost
        except MeshError as exc:
            log.debug("refreshing lock %r failed (%s), trying again", lease.name, exc)
            due = time.monotonic() + margin(lease.ttl)
        except Exception:
            # A bug: keeping the lease on faith would be worse than losing it.
            log.exception("refreshing lock %r failed", lease.name)
            lease._lose("the refresh task failed")
            return
        else:
            due = lease.renewed_at + lease.ttl / 3
