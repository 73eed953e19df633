"""Leader election in etcd, after etcd's client/v3/concurrency Election.

Campaign: grant a lease, then one Txn: if ``create_revision(leader_key) == 0``
put ``{"id", "address"}`` under that lease. The winner's term is identified by
the key's create revision, which every map write compares (see mapstore), so a
deposed leader cannot write even if it does not know yet. A loser watches the
key and tries again when it is deleted (the leader resigned, or its lease ran
out). The leader renews its lease three times per TTL and gives up leadership
at once when a renewal says the lease is gone, or before the lease could run
out when renewals fail: its term has a deadline on the local monotonic clock
(start of the last successful renewal + TTL - a margin), checked on its own
timer and by `Election.is_leader`, so that a renewal hanging on an unreachable
etcd member cannot stretch the time the coordinator believes it leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

from common.clock import SYSTEM_CLOCK, Clock, from_seconds, to_seconds
from common.clustermap import leader_key
from common.etcd import PrefixFollower, renew_lease
from common.tasks import cancel

log = logging.getLogger(__name__)

CALL_TIMEOUT = 2.0
"""Deadline of each etcd call made here, seconds."""


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads, as the leader key says."""

    coordinator_id: str
    address: str
    create_revision: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"id": self.coordinator_id, "address": self.address}).encode()

    @classmethod
    def from_json(cls, raw: bytes, create_revision: int = 0) -> LeaderInfo:
        data = json.loads(raw)
        return cls(str(data.get("id", "")), str(data.get("address", "")), create_revision)


class Leadership:
    """One term as leader: the lease and the leader key's create revision."""

    def __init__(self, lease_id: int, create_revision: int, valid_until: float,
                 margin: float = 0.0) -> None:
        self.lease_id = lease_id
        self.create_revision = create_revision
        self.valid_until = valid_until
        """Monotonic time until which etcd certainly keeps the lease: the start of the
        last successful grant or renewal plus the TTL etcd gave."""
        self.margin = margin
        """How long before ``valid_until`` the term ends: our clock and etcd's run at
        slightly different speeds, and work decided just before must still finish."""
        self.lost = asyncio.Event()

    @property
    def deadline(self) -> float:
        """Monotonic time at which the term ends unless a renewal moves it."""
        return self.valid_until - self.margin

    def holds(self, now: float) -> bool:
        """Whether the term still stands at monotonic time ``now``."""
        return not self.lost.is_set() and now < self.deadline

    def __repr__(self) -> str:
        return f"Leadership(lease={self.lease_id:x}, revision={self.create_revision})"


LeaderWork = Callable[[Leadership], Coroutine[Any, Any, None]]


class Election:
    """Campaign for ``leader_key(cluster)`` until closed; run ``work`` while leading.

    ``work`` is cancelled the moment leadership is lost; if it raises, the term
    ends (the lease is revoked) and the campaign starts over.
    """

    def __init__(self, etcd: aetcd.Client, cluster: str, coordinator_id: str, address: str,
                 ttl: int, work: LeaderWork, clock: Clock = SYSTEM_CLOCK) -> None:
        self._etcd = etcd
        # The term's deadline and the renewals' pace are on this clock's monotonic
        # time (float seconds here); a test drives them with a manual one.
        self._time = clock
        self._clock: Callable[[], float] = lambda: to_seconds(clock.monotonic_ns())
        self._interval = max(ttl / 3, 0.2)
        """Between renewals: three per TTL, so one lost renewal still leaves a margin."""
        self._margin = min(self._interval / 2, 0.5)
        self._key = leader_key(cluster)
        self._me = LeaderInfo(coordinator_id, address)
        self._ttl = ttl
        self._work = work
        self.leader: LeaderInfo | None = None
        """The leader as last seen in etcd (ourselves while leading)."""
        self.leadership: Leadership | None = None
        """Our current term, None when not leading."""
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unrevoked: set[int] = set()
        self._observer = PrefixFollower(etcd, self._key, self._on_read, self._on_event,
                                        name="election-observe")

    @property
    def coordinator_id(self) -> str:
        return self._me.coordinator_id

    @property
    def is_leader(self) -> bool:
        """Leading now: a term that is not lost and whose deadline has not passed (checked
        here too, so that it is exact even before the deadline timer has run)."""
        term = self.leadership
        return term is not None and term.holds(self._clock())

    async def start(self) -> None:
        """Read the leader key (raising if etcd is unreachable), then campaign."""
        await self._observer.start()
        self._tasks = [asyncio.create_task(self._campaign(), name="election-campaign")]

    async def close(self) -> None:
        """Stop campaigning; a leader resigns at once (its lease is revoked)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await cancel(task)  # again until it ends: a renewal may swallow one
        self._tasks = []
        await self._observer.close()

    async def wait_leading(self, timeout: float) -> Leadership | None:
        """Our term once we lead, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_leader:
                return self.leadership
            await asyncio.sleep(0.02)
        return None

    # -- observing the key ----------------------------------------------------

    def _set_leader(self, leader: LeaderInfo | None) -> None:
        # Only a real change wakes the campaign, or a failed attempt (which
        # reports the holder) would retry at once, in a loop.
        if leader != self.leader:
            self.leader = leader
            log.info("leader is now %s", f"{leader.coordinator_id} at {leader.address}"
                     if leader else "nobody")
            self._changed.set()

    def _on_read(self, kvs: list[tuple[bytes, bytes, int]]) -> None:
        leader = None
        for key, value, create_revision in kvs:
            if key == self._key:
                leader = self._parse(value, create_revision)
        self._set_leader(leader)

    @staticmethod
    def _parse(raw: bytes, create_revision: int) -> LeaderInfo | None:
        try:
            return LeaderInfo.from_json(raw, create_revision)
        except (ValueError, AttributeError) as exc:
            log.warning("unreadable leader key (%s); treating it as held", exc)
            return LeaderInfo("?", "", create_revision)

    def _on_event(self, kind: str, key: bytes, value: bytes, mod_revision: int) -> None:
        if key != self._key:
            return
        if kind == "DELETE":
            term = self.leadership
            if term is not None and mod_revision > term.create_revision:
                log.warning("leader key deleted under us")
                term.lost.set()
            self._set_leader(None)
        else:
            # A watch event carries no create revision; the key is only ever
            # created (never overwritten), so it is this one.
            self._set_leader(self._parse(value, mod_revision))

    # -- campaigning ------------------------------------------------------------

    async def _campaign(self) -> None:
        delay = 0.1
        while True:
            self._changed.clear()
            try:
                term = await self._try_acquire()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("campaign failed (%s); retrying", str(exc) or type(exc).__name__)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.1
            if term is None:
                # Someone leads: wait for the key to change, re-checking now and
                # then in case a watch event was missed.
                with contextlib.suppress(TimeoutError):  # (timeout: see leader.py)
                    async with asyncio.timeout(self._ttl):
                        await self._changed.wait()
                continue
            crashed = await self._lead(term)
            if crashed:
                # Let another coordinator take over before trying again.
                await asyncio.sleep(self._ttl)

    async def _try_acquire(self) -> Leadership | None:
        await self._revoke_leftovers()
        tx = self._etcd.transactions
        sent = self._clock()
        lease = await asyncio.wait_for(self._etcd.lease(self._ttl), CALL_TIMEOUT)
        try:
            ok, responses = await asyncio.wait_for(self._etcd.transaction(
                compare=[tx.create(self._key) == 0],
                success=[tx.put(self._key, self._me.to_json(), lease=lease.id)],
                failure=[tx.get(self._key)],
            ), CALL_TIMEOUT)
        except BaseException:
            await self._revoke(lease.id)  # we may have won without knowing: undo it
            raise
        if ok:
            revision = int(responses[0].response_put.header.revision)
            return Leadership(lease.id, revision, sent + lease.ttl, self._margin)
        await self._revoke(lease.id)
        for value, kv in responses[0] if responses else ():
            self._set_leader(self._parse(value, kv.create_revision))
        return None

    async def _lead(self, term: Leadership) -> bool:
        """Hold the term until it is lost or ``work`` ends; True if work crashed."""
        self.leadership = term
        self._set_leader(LeaderInfo(self._me.coordinator_id, self._me.address,
                                    term.create_revision))
        log.info("elected leader (lease %x, revision %d)", term.lease_id, term.create_revision)
        work = asyncio.create_task(self._work(term), name="leader-work")
        keep = asyncio.create_task(self._keepalive(term), name="leader-keepalive")
        lost = asyncio.create_task(term.lost.wait(), name="leader-lost")
        expiry = asyncio.create_task(self._expire(term), name="leader-deadline")
        crashed = False
        try:
            await asyncio.wait({work, keep, lost, expiry}, return_when=asyncio.FIRST_COMPLETED)
            if work.done() and not work.cancelled() and work.exception() is not None:
                crashed = True
                log.error("leader work failed; resigning", exc_info=work.exception())
        finally:
            term.lost.set()
            self.leadership = None
            for task in (work, keep, lost, expiry):
                task.cancel()
            for task in (work, keep, lost, expiry):
                # Again until it ends: a renewal that swallowed its cancel would
                # keep the lease, and with it a term nobody works in, alive.
                with contextlib.suppress(Exception):
                    await cancel(task)
            await self._revoke(term.lease_id)
            log.info("no longer leader (revision %d)", term.create_revision)
        return crashed

    async def _keepalive(self, term: Leadership) -> None:
        """Renew the lease; return when etcd says it is gone. (Running out of time is
        `_expire`'s to notice: a renewal may hang past the deadline.)"""
        interval = self._interval
        wait = interval
        while True:
            await self._time.sleep(from_seconds(wait))
            sent = self._clock()
            try:
                # No use waiting past the deadline: the term is over by then.
                budget = max(min(interval, CALL_TIMEOUT, term.deadline - sent), 0.05)
                reply = await renew_lease(self._etcd, term.lease_id, budget)
                if reply is None or reply.TTL <= 0:
                    log.warning("leadership lease %x is gone", term.lease_id)
                    return
                # A renewal's TTL counts from when etcd got it, no earlier than we sent it.
                term.valid_until = max(term.valid_until, sent + reply.TTL)
                wait = interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leadership lease renewal failed (%s)", str(exc) or type(exc).__name__)
                wait = min(interval, 0.1)  # likely on another etcd member by now

    async def _expire(self, term: Leadership) -> None:
        """Return when the term's deadline passes without a renewal having moved it."""
        while True:
            left = term.deadline - self._clock()
            if left <= 0:
                log.warning("could not renew the leadership lease in time; resigning")
                return
            await self._time.sleep(from_seconds(left))

    async def _revoke(self, lease_id: int) -> None:
        try:
            await asyncio.wait_for(self._etcd.revoke_lease(lease_id), 1.0)
        except asyncio.CancelledError:
            raise
        except (TimeoutError, ConnectionFailedError, ConnectionTimeoutError) as exc:
            # etcd is away; when it is back (an etcd restart keeps leases), revoking
            # frees the leader key now instead of after a whole TTL.
            log.debug("could not revoke lease %x: %s", lease_id, exc)
            self._unrevoked.add(lease_id)
        except Exception as exc:  # e.g. the lease is already gone
            log.debug("could not revoke lease %x: %s", lease_id, exc)

    async def _revoke_leftovers(self) -> None:
        for lease_id in sorted(self._unrevoked):
            self._unrevoked.discard(lease_id)
            await self._revoke(lease_id)
