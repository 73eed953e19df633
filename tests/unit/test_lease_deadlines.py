"""The coordinator's term and a node's lease end on the local clock, renewal or not.

A renewal can hang (its etcd member died or is cut off): what the process
believes about its lease must not wait for it. Fake etcd clients here answer,
hang or say the lease is gone; clocks are injected where a test needs to move
time by hand (the election's is a `ManualClock`: its renewals and deadline run
as the test advances it, not in real time).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from common.clock import MILLISECOND, ManualClock, from_seconds, to_seconds
from coordinator.election import Election, Leadership
from nodes.registration import Registration


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    TTL: int


@dataclass
class Lease:
    id: int
    ttl: int


@dataclass
class FakeEtcd:
    """The calls Election and Registration make; ``mode`` says how renewals go."""

    ttl: int
    mode: str = "ok"
    """ok: renewed; hang: never answers; gone: etcd no longer knows the lease."""
    clock: FakeClock | None = None
    renewal_takes: float = 0.0
    """Moves ``clock`` by this much during each renewal (the time a reply takes)."""
    renewals: int = 0
    revoked: list[int] = field(default_factory=list)
    granted: int = 0
    puts: list[tuple[bytes, int]] = field(default_factory=list)

    async def refresh_lease(self, lease_id: int) -> Any:
        self.renewals += 1
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.clock is not None:
            self.clock.now += self.renewal_takes
        return Reply(0 if self.mode == "gone" else self.ttl)

    async def revoke_lease(self, lease_id: int) -> None:
        self.revoked.append(lease_id)

    async def lease(self, ttl: int) -> Lease:
        self.granted += 1
        return Lease(100 + self.granted, ttl)

    async def put(self, key: bytes, value: bytes, lease: int) -> None:
        self.puts.append((key, lease))

    # Registration's put: a transaction on the key being absent (no key is kept).
    transactions = SimpleNamespace(mod=lambda key: _Compare(),
                                   put=lambda key, value, lease: (key, lease))

    async def get(self, key: bytes) -> None:
        return None

    lost_races: int = 0
    """Transactions to refuse first, as if another process wrote the key meanwhile."""

    async def transaction(self, compare: list[Any], success: list[Any], failure: list[Any]
                          ) -> tuple[bool, list[Any]]:
        assert compare == [("==", 0)]
        if self.lost_races:
            self.lost_races -= 1
            return False, []
        self.puts.extend(success)
        return True, []


class _Compare:
    def __eq__(self, revision: object) -> Any:
        return ("==", revision)


async def _forever(_term: Leadership) -> None:
    await asyncio.Event().wait()


def _election(etcd: FakeEtcd, ttl: int, clock: ManualClock) -> Election:
    return Election(etcd, "unit", "a", "a:1", ttl, _forever, clock=clock)


def _now(clock: ManualClock) -> float:
    """The election's time: the clock's monotonic time in seconds."""
    return to_seconds(clock.monotonic_ns())


async def _run_until(clock: ManualClock, task: asyncio.Future[Any], limit: float) -> float:
    """Advance ``clock`` a millisecond at a time until ``task`` is done (at most
    ``limit`` seconds); the time that took."""
    start = _now(clock)
    while not task.done() and _now(clock) - start < limit:
        await clock.settle(MILLISECOND)
    return _now(clock) - start


async def test_is_leader_ends_at_the_deadline_without_waiting_for_any_task() -> None:
    clock = ManualClock()
    election = _election(FakeEtcd(ttl=3), ttl=3, clock=clock)
    margin = election._margin
    term = Leadership(1, 10, valid_until=_now(clock) + 3, margin=margin)
    election.leadership = term
    assert election.is_leader
    clock.advance(from_seconds(3 - margin - 0.01))
    assert election.is_leader
    clock.advance(20 * MILLISECOND)  # nothing ran in between: the property looks at the clock
    assert not election.is_leader
    assert not term.holds(_now(clock))


async def test_a_hanging_renewal_ends_the_term_at_its_deadline() -> None:
    ttl = 1
    etcd = FakeEtcd(ttl=ttl, mode="hang")
    clock = ManualClock()
    election = _election(etcd, ttl, clock)
    start = _now(clock)
    term = Leadership(7, 10, valid_until=start + ttl, margin=election._margin)
    lead = asyncio.create_task(election._lead(term))
    await clock.settle(50 * MILLISECOND)
    assert election.is_leader
    await _run_until(clock, lead, 2 * ttl)
    await lead
    ended = _now(clock) - start
    assert etcd.renewals >= 1  # a renewal was in flight (and hung) meanwhile
    # At the deadline (TTL - margin after the grant), not a renewal timeout later:
    # etcd may give the key to another coordinator from TTL on.
    assert term.deadline - start - 0.01 <= ended < ttl, ended
    assert term.lost.is_set() and not election.is_leader
    assert etcd.revoked == [7]


async def test_successful_renewals_move_the_deadline() -> None:
    ttl = 1
    etcd = FakeEtcd(ttl=ttl)
    clock = ManualClock()
    election = _election(etcd, ttl, clock)
    start = _now(clock)
    term = Leadership(8, 10, valid_until=start + ttl, margin=election._margin)
    lead = asyncio.create_task(election._lead(term))
    await _run_until(clock, lead, 1.5 * ttl)
    assert election.is_leader and etcd.renewals >= 2
    assert term.valid_until > start + ttl
    lead.cancel()
    await asyncio.gather(lead, return_exceptions=True)


async def test_a_lease_etcd_forgot_ends_the_term_at_once() -> None:
    ttl = 3
    etcd = FakeEtcd(ttl=ttl, mode="gone")
    clock = ManualClock()
    election = _election(etcd, ttl, clock)
    start = _now(clock)
    term = Leadership(9, 10, valid_until=start + ttl, margin=election._margin)
    lead = asyncio.create_task(election._lead(term))
    await _run_until(clock, lead, ttl)
    await lead
    # The first renewal (after a third of the TTL) says so: no waiting for the deadline.
    assert _now(clock) - start < ttl / 3 + 0.5
    assert not election.is_leader


async def test_node_lease_counts_from_the_renewal_request() -> None:
    clock = FakeClock()
    etcd = FakeEtcd(ttl=2, clock=clock, renewal_takes=0.4)
    registration = Registration(etcd, b"/unit/nodes/n1", b"{}", 2, clock=clock)
    await registration._register()
    assert registration.valid_until == clock.now + 2
    sent = clock.now = clock.now + 0.6
    await registration.renew_once(0.5)
    # The reply came 0.4 s later, but etcd may have renewed at once: count from the request.
    assert registration.valid_until == sent + 2


async def test_node_lease_does_not_move_while_a_renewal_hangs() -> None:
    clock = FakeClock()
    etcd = FakeEtcd(ttl=2, clock=clock)
    registration = Registration(etcd, b"/unit/nodes/n1", b"{}", 2, clock=clock)
    await registration._register()
    before = registration.valid_until
    etcd.mode = "hang"
    started = time.monotonic()
    try:
        await registration.renew_once(0.2)
    except TimeoutError:
        pass
    else:
        raise AssertionError("a hanging renewal must time out")
    assert time.monotonic() - started < 1.0  # bounded: the next try may reach another member
    assert registration.valid_until == before


async def test_node_lease_gone_is_invalid_at_once_then_registered_again() -> None:
    clock = FakeClock()
    etcd = FakeEtcd(ttl=2, clock=clock)
    seen: list[float] = []

    async def before_valid() -> None:
        seen.append(registration.valid_until)  # the map is read before the lease counts

    registration = Registration(etcd, b"/unit/nodes/n1", b"{}", 2,
                                before_valid=before_valid, clock=clock)
    await registration._register()
    first = registration.lease_id
    etcd.mode = "gone"
    clock.now += 0.5
    await registration.renew_once(0.5)
    assert seen[-1] == 0.0  # while registering again nothing relied on the old lease
    assert registration.lease_id != first and etcd.granted == 2
    assert registration.valid_until == clock.now + 2
    assert registration.registered.is_set()


async def test_node_registration_that_lost_a_race_looks_again_and_drops_its_lease() -> None:
    etcd = FakeEtcd(ttl=2, lost_races=1)
    registration = Registration(etcd, b"/unit/nodes/n1", b"{}", 2)
    await registration._register()
    assert etcd.revoked == [101]  # the lease of the lost transaction
    assert registration.lease_id == 102 and etcd.puts == [(b"/unit/nodes/n1", 102)]
