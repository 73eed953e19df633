"""Keeping this node's key alive in etcd under a lease.

The key disappears when the lease ends: at once when the node revokes it on a
clean shutdown, or ``ttl`` seconds after the node stops renewing it (crash,
SIGKILL, network partition). If etcd forgets the lease (etcd restarted from an
old snapshot, or this process was paused past the TTL) the node registers again
with a fresh lease, so membership heals without a manual step.

The key is the node's id, and one live process may hold it. A process takes
the key only if it is free or was written by this node itself (``ours``: this
process, or its predecessor on the same data dir, restarted before that one's
lease ran out); a key another process wrote is waited on for twice its lease
ttl, as a dead process's lease runs out by then, and is refused with
`NodeIdInUse` if its lease is still being renewed: a second process given the same
``--node-id`` (a copied unit file, say) would otherwise overwrite the first
one's registration, and the two would take each other's groups away in turn.
Each put is a transaction on the revision seen, so two processes starting at
once cannot both win.

`Registration.valid_until` is what the node's serving decisions are judged by, on
the local monotonic clock: it moves only when a renewal succeeds (to that
renewal's start plus the TTL etcd gave), so a renewal that hangs on an
unreachable etcd member never stretches it, and a renewal that says the lease
is gone ends it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aetcd
import aetcd.exceptions

from common.etcd import CALL_TIMEOUT, renew_lease
from common.process import StartupError
from common.tasks import cancel

log = logging.getLogger(__name__)

_MARGIN = 1.0
"""Seconds past the wait for a foreign key's lease before its holder is taken to
be alive (etcd's lease clock and ours run at about the same rate)."""


class NodeIdInUse(StartupError):
    """Another live process keeps this node's key registered."""


class Registration:
    """One key in etcd, kept alive for as long as ``start()``..``close()`` runs."""

    def __init__(
        self, etcd: aetcd.Client, key: bytes, value: bytes, ttl: int,
        before_valid: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        ours: Callable[[bytes], bool] = lambda value: False,
        on_taken: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._etcd = etcd
        self._clock = clock
        # Awaited after each (re-)registration, before valid_until moves: after a
        # lost lease the node must learn what changed (the cluster map) before it
        # trusts its old role again.
        self._before_valid = before_valid
        self._key = key
        self._value = value
        self._ours = ours
        # Called (after start) when another process took the key while our lease
        # was gone: this process must stop.
        self._on_taken = on_taken
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

    async def update(self, value: bytes) -> bool:
        """Write ``value`` in place of the key's value, under the same lease. False
        if the key is not under our lease now (lost, or another process wrote it):
        the next registration writes ``value``."""
        self._value = value
        lease_id = self._lease_id
        if lease_id is None:
            return False
        found = await asyncio.wait_for(self._etcd.get(self._key), CALL_TIMEOUT)
        # Our lease on it proves it ours: a lease id is granted once.
        if found is None or int(found.lease) != lease_id:
            return False
        tx = self._etcd.transactions
        ok, _ = await asyncio.wait_for(self._etcd.transaction(
            compare=[tx.mod(self._key) == int(found.mod_revision)],
            success=[tx.put(self._key, value, lease=lease_id)],
            failure=[],
        ), CALL_TIMEOUT)
        return bool(ok)

    async def close(self) -> None:
        """Stop renewing and revoke the lease, so the key disappears at once."""
        self.valid_until = 0.0  # from now on the node relies on no lease
        if self._task is not None:
            with contextlib.suppress(Exception):
                await cancel(self._task)  # a renewal may swallow one cancel
            self._task = None
        if self._lease_id is not None:
            try:
                await asyncio.wait_for(self._etcd.revoke_lease(self._lease_id), timeout=2)
            except Exception as exc:  # the lease then simply runs out
                log.warning("could not revoke lease %x: %s", self._lease_id, exc)
            self._lease_id = None
        self.registered.clear()

    async def _register(self) -> None:
        tx = self._etcd.transactions
        while True:
            revision = await self._free_revision()
            sent = self._clock()
            lease = await self._etcd.lease(self._ttl)
            ok, _ = await asyncio.wait_for(self._etcd.transaction(
                compare=[tx.mod(self._key) == revision],
                success=[tx.put(self._key, self._value, lease=lease.id)],
                failure=[],
            ), CALL_TIMEOUT)
            if ok:
                break
            # Written since we looked (another process starting too): look again.
            await asyncio.wait_for(self._etcd.revoke_lease(lease.id), CALL_TIMEOUT)
        self._lease_id = lease.id
        if self._before_valid is not None:
            await self._before_valid()
        self.valid_until = sent + lease.ttl
        self.registered.set()
        log.info("registered %s with lease %x (ttl %ss)", self._key.decode(), lease.id, lease.ttl)

    async def _free_revision(self) -> int:
        """The key's mod revision (0: absent) once this process may write it;
        `NodeIdInUse` if another live process holds it."""
        while True:
            found = await asyncio.wait_for(self._etcd.get(self._key), CALL_TIMEOUT)
            if found is None:
                return 0
            if self._ours(found.value):
                return int(found.mod_revision)
            holder, lease_id = _brief(found.value), int(found.lease)
            if not lease_id:
                raise NodeIdInUse(f"{self._key.decode()} is held with no lease ({holder}): "
                                  "give this node another --node-id, or delete the key")
            info = await asyncio.wait_for(
                self._etcd.get_lease_info(lease_id, keys=False), CALL_TIMEOUT)
            # A dead holder's lease runs out within its ttl; twice that, as a new
            # etcd leader gives every lease its whole ttl again.
            wait = 2 * max(int(info.grantedTTL), 1) + _MARGIN
            log.warning("%s is registered by another process (%s); waiting up to %.0f s "
                        "for its lease to run out", self._key.decode(), holder, wait)
            deadline = time.monotonic() + wait
            while (found is not None and int(found.lease) == lease_id
                   and time.monotonic() < deadline):
                await asyncio.sleep(min(0.2, wait / 10))
                found = await asyncio.wait_for(self._etcd.get(self._key), CALL_TIMEOUT)
            if found is not None and int(found.lease) == lease_id:
                raise NodeIdInUse(
                    f"{self._key.decode()} is held by another live process ({holder}), "
                    "which kept renewing its lease: give each node its own --node-id")
            # Gone, or written again since (by whom: look again).

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
            except NodeIdInUse as exc:
                log.error("%s", exc)
                if self._on_taken is not None:
                    self._on_taken(exc)
                return
            except Exception as exc:
                log.warning("lease renewal failed (%s); retrying", str(exc) or type(exc).__name__)
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


def _brief(value: bytes, limit: int = 200) -> str:
    """A registration value for a log line or an error (bounded: etcd is not ours)."""
    text = value.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "..."
