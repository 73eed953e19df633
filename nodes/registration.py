"""Keeping this node's key alive in etcd under a lease.

The key disappears when the lease ends: at once when the node revokes it on a
clean shutdown, or ``ttl`` seconds after the node stops renewing it (crash,
SIGKILL, network partition). If etcd forgets the lease (etcd restarted from an
old snapshot, or this process was paused past the TTL) the node registers again
with a fresh lease, so membership heals without a manual step.

`Registration.valid_until` is what the node's serving decisions are judged by, on
the local monotonic clock: it moves only when a renewal succeeds (to that
renewal's start plus the TTL etcd gave), so a renewal that hangs on an
unreachable etcd member never stretches it, and a renewal that says the lease
is gone ends it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aetcd
import aetcd.exceptions

from common.etcd import CALL_TIMEOUT, renew_lease

log = logging.getLogger(__name__)


class Registration:
    """One key in etcd, kept alive for as long as ``start()``..``close()`` runs."""

    def __init__(
        self, etcd: aetcd.Client, key: bytes, value: bytes, ttl: int,
        before_valid: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._etcd = etcd
        self._clock = clock
        # Awaited after each (re-)registration, before valid_until moves: after a
        # lost lease the node must learn what changed (the cluster map) before it
        # trusts its old role again.
        self._before_valid = before_valid
        self._key = key
        self._value = value
        self._ttl = ttl
        self._lease_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        # Monotonic time until which etcd certainly still holds our lease: the last
        # successful renewal plus the TTL etcd granted. Writes that rely on
        # ownership must stop before this passes.
        self.valid_until = 0.0
        self.registered = asyncio.Event()

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    async def start(self, patience: float = 15.0) -> None:
        """Register now, then keep the lease alive. A failure to connect is retried
        for up to ``patience`` seconds (etcd starting, a busy machine), then raised."""
        deadline = time.monotonic() + patience
        delay = 0.1
        while True:
            try:
                await self._register()
                break
            except (aetcd.exceptions.ConnectionFailedError,
                    aetcd.exceptions.ConnectionTimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("etcd is not reachable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._task = asyncio.create_task(self._keepalive(), name="etcd-keepalive")

    async def close(self) -> None:
        """Stop renewing and revoke the lease, so the key disappears at once."""
        self.valid_until = 0.0  # from now on the node relies on no lease
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._lease_id is not None:
            try:
                await asyncio.wait_for(self._etcd.revoke_lease(self._lease_id), timeout=2)
            except Exception as exc:  # the lease then simply runs out
                log.warning("could not revoke lease %x: %s", self._lease_id, exc)
            self._lease_id = None
        self.registered.clear()

    async def _register(self) -> None:
        sent = self._clock()
        lease = await self._etcd.lease(self._ttl)
        await self._etcd.put(self._key, self._value, lease=lease.id)
        self._lease_id = lease.id
        if self._before_valid is not None:
            await self._before_valid()
        self.valid_until = sent + lease.ttl
        self.registered.set()
        log.info("registered %s with lease %x (ttl %ss)", self._key.decode(), lease.id, lease.ttl)

    async def _keepalive(self) -> None:
        # Renew three times per TTL: one lost renewal still leaves a margin.
        interval = max(self._ttl / 3, 0.2)
        wait = interval
        while True:
            await asyncio.sleep(wait)
            wait = interval
            try:
                await self.renew_once(min(interval, CALL_TIMEOUT))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease renewal failed (%s); retrying", exc)
                # Soon: the etcd client has likely moved to another member already.
                wait = min(interval, 0.1)

    async def renew_once(self, timeout: float) -> None:
        """One renewal (registering again if the lease is gone), the renewal bounded by
        ``timeout`` seconds, so that a hung etcd member costs one try, not the lease.
        (Registering is not cut short: it must not end between granting the lease and
        ``before_valid``.)"""
        if self._lease_id is None:
            await self._register()
            return
        sent = self._clock()
        reply = await renew_lease(self._etcd, self._lease_id, timeout)
        if reply is None or reply.TTL <= 0:
            log.warning("lease %x is gone; registering again", self._lease_id)
            # etcd no longer holds it: whatever the clock says, nothing may rely on it.
            self.valid_until = 0.0
            self.registered.clear()
            self._lease_id = None
            await self._register()
        else:
            self.valid_until = max(self.valid_until, sent + reply.TTL)
