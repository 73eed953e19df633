"""Pure logic of the lock client: error mapping, the local lease deadline, the
background refresh, and what acquire / refresh / release send and make of the
answers. No node: calls go to a scripted ``_rpc``."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import grpc
import pytest

from clients import (
    ConflictError,
    FailedPreconditionError,
    Lease,
    LockClient,
    LockLostError,
    LockNotHeldError,
    LockTimeoutError,
    MeshError,
    UnavailableError,
)
from clients.errors import from_rpc_error
from clients.lease import attempt_limit, keep_alive, local_deadline, margin
from clients.lock import FOREVER
from clients.mesh import Mesh
from clients.retry import Verdict, classify
from clients.router import Target
from common.errors import MeshStatusError, Reason
from mesh.lock.v1 import lock_pb2 as pb

ADDRESS = "10.0.0.1:7000"


def rpc_error(code: grpc.StatusCode, reason: Reason | str,
              metadata: dict[str, str] | None = None) -> MeshError:
    """An error as the client sees it, parsed from a real status."""
    status = MeshStatusError(code, f"{reason}", Reason(reason), metadata).to_status()
    error = grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(),
                                 grpc.aio.Metadata(*status.trailing_metadata), status.details)
    return from_rpc_error(error, ADDRESS)


def lock_timeout(token: int = 0) -> MeshError:
    return rpc_error(grpc.StatusCode.ABORTED, Reason.LOCK_TIMEOUT,
                     {"fencing_token": str(token), "waiters": "1"})


def not_held() -> MeshError:
    return rpc_error(grpc.StatusCode.FAILED_PRECONDITION, Reason.LOCK_NOT_HELD)


def unavailable(reason: Reason = Reason.NOT_COMMITTED) -> MeshError:
    return rpc_error(grpc.StatusCode.UNAVAILABLE, reason)


# -- errors -----------------------------------------------------------------------

def test_lock_reasons_map_to_their_errors() -> None:
    timeout = lock_timeout(token=(7 << 32) + 3)
    assert isinstance(timeout, LockTimeoutError) and isinstance(timeout, ConflictError)
    assert timeout.code == grpc.StatusCode.ABORTED and timeout.reason == "LOCK_TIMEOUT"
    assert timeout.fencing_token == (7 << 32) + 3 and timeout.waiters == 1
    assert timeout.address == ADDRESS
    assert classify(timeout) is Verdict.FINAL  # a definite answer: never retried as is

    gone = not_held()
    assert isinstance(gone, LockNotHeldError) and isinstance(gone, FailedPreconditionError)
    assert classify(gone) is Verdict.FINAL

    # Missing or garbled metadata reads as 0.
    bare = rpc_error(grpc.StatusCode.ABORTED, Reason.LOCK_TIMEOUT)
    assert isinstance(bare, LockTimeoutError) and bare.fencing_token == 0
    assert LockTimeoutError("x", metadata={"fencing_token": "?"}).fencing_token == 0
    # Other lock refusals keep their code's class, with the reason.
    mismatch = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, Reason.PERMITS_MISMATCH,
                         {"max_permits": "3"})
    assert type(mismatch) is FailedPreconditionError and mismatch.metadata["max_permits"] == "3"
    lost = LockLostError("gone")
    assert isinstance(lost, MeshError) and lost.code is None


# -- the local deadline -------------------------------------------------------------

def test_margin_is_a_tenth_of_the_ttl_at_most_a_second() -> None:
    assert margin(1.0) == pytest.approx(0.1)
    assert margin(5.0) == pytest.approx(0.5)
    assert margin(10.0) == pytest.approx(1.0)
    assert margin(3600.0) == 1.0
    assert local_deadline(100.0, 2.0) == pytest.approx(101.8)
    assert local_deadline(100.0, 30.0) == pytest.approx(129.0)


class FakeLeases:
    """A LockClient stand-in for leases: refreshes answer from a script."""

    def __init__(self, *outcomes: MeshError | None, forever: bool = False) -> None:
        self.outcomes = list(outcomes)
        self.forever = forever
        self.refreshes = 0
        self.released: list[Lease] = []

    async def refresh(self, lease: Lease, ttl: float | None = None, *,
                      timeout: float | None = None) -> None:
        assert timeout is not None and timeout > 0
        self.refreshes += 1
        sent = time.monotonic()
        outcome = self.outcomes[0] if self.forever else (
            self.outcomes.pop(0) if self.outcomes else None)
        if isinstance(outcome, LockNotHeldError):
            lease._lose("not held")
        if outcome is not None:
            raise outcome
        lease._renewed(sent, ttl or lease.ttl, time.time() + lease.ttl)

    async def release(self, lease: Lease, *, timeout: float | None = None) -> None:
        self.released.append(lease)
        lease._mark_released()


def lease(client: Any, ttl: float = 30.0, age: float = 0.0) -> Lease:
    """A lease whose grant was sent ``age`` seconds ago."""
    return Lease(client, "orders", "L1", 42, ttl, 1, time.time() + ttl, time.monotonic() - age)


async def test_lease_is_lost_once_its_local_deadline_passed() -> None:
    fresh = lease(FakeLeases(), ttl=30.0)
    assert fresh.held and not fresh.lost.is_set() and fresh.lost_reason is None
    fresh.check()
    assert 28.0 < fresh.remaining <= 29.0

    # Granted (sent) 1.95 s ago with a 2 s ttl: past sent + ttl - margin already,
    # though the primary's expire_time is still in the future.
    stale = lease(FakeLeases(), ttl=2.0, age=1.95)
    assert stale.expire_time > time.time()
    assert not stale.held
    assert stale.lost.is_set() and stale.lost_reason
    with pytest.raises(LockLostError):
        stale.check()


async def test_timer_sets_lost_without_anyone_asking() -> None:
    soon = lease(FakeLeases(), ttl=1.0, age=0.8)  # deadline in about 0.1 s
    await asyncio.wait_for(soon.lost.wait(), 5)
    assert soon.lost_reason and not soon.held


async def test_renewal_moves_the_deadline_but_a_lost_lease_stays_lost() -> None:
    held = lease(FakeLeases(), ttl=2.0, age=1.5)
    assert held.held
    now = time.monotonic()
    held._renewed(now, 2.0, time.time() + 2)
    assert held.deadline == pytest.approx(now + 1.8)
    assert held.renewed_at == now
    await asyncio.sleep(0.5)  # the old deadline (and its timer) passes
    assert held.held and not held.lost.is_set()

    lost = lease(FakeLeases(), ttl=2.0, age=3.0)
    assert not lost.held
    lost._renewed(time.monotonic(), 2.0, time.time() + 2)
    assert not lost.held and lost.lost.is_set()


async def test_release_stops_the_timer_and_is_not_a_loss() -> None:
    client = FakeLeases()
    soon = lease(client, ttl=1.0, age=0.85)
    await soon.release()
    assert not soon.held and soon.released
    await asyncio.sleep(0.1)
    assert not soon.lost.is_set() and soon.lost_reason is None
    with pytest.raises(LockNotHeldError):
        soon.check()


async def test_on_lost_runs_once_and_a_failing_callback_is_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[Lease] = []

    def broken(_: Lease) -> None:
        raise RuntimeError("boom")

    short = lease(FakeLeases(), ttl=1.0, age=0.8)
    short.on_lost(broken)
    short.on_lost(seen.append)
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(short.lost.wait(), 5)
        short._lose("again")
    assert seen == [short]
    assert "on_lost callback" in caplog.text
    late: list[Lease] = []
    short.on_lost(late.append)  # registered after the loss: called at once
    assert late == [short]


async def test_check_from_another_thread_signals_on_the_loop() -> None:
    stale = Lease(FakeLeases(), "orders", "L1", 1, 2.0, 1, 0.0, time.monotonic())
    ran_on: list[threading.Thread] = []
    stale.on_lost(lambda _: ran_on.append(threading.current_thread()))  # watched from now
    stale._timer.cancel()  # type: ignore[union-attr]  # only the thread may notice
    stale.deadline = time.monotonic() - 1
    errors: list[BaseException] = []

    def other() -> None:
        try:
            stale.check()
        except LockLostError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    await asyncio.to_thread(thread.join)
    assert len(errors) == 1
    await asyncio.wait_for(stale.lost.wait(), 5)
    assert ran_on == [threading.current_thread()]


async def test_only_a_watched_lease_has_a_timer() -> None:
    """Acquire-and-release with nobody watching sets no timer; asking for ``lost``
    (or registering ``on_lost``) starts watching the deadline."""
    quiet = lease(FakeLeases(), ttl=30.0)
    assert quiet._timer is None and quiet.held
    await quiet.release()
    assert not quiet.lost.is_set() and quiet._timer is None

    watched = lease(FakeLeases(), ttl=30.0)
    assert not watched.lost.is_set()
    assert watched._timer is not None
    timer = watched._timer
    await watched.release()
    assert timer.cancelled()


async def test_lost_first_asked_from_another_thread_is_set_on_time() -> None:
    soon = lease(FakeLeases(), ttl=3.0, age=2.0)  # deadline in about 0.7 s
    lost = await asyncio.to_thread(lambda: soon.lost)  # the timer is armed on the loop
    assert not lost.is_set()
    await asyncio.wait_for(lost.wait(), 5)
    assert soon.lost_reason and not soon.held


# -- background refresh ---------------------------------------------------------------

async def test_keep_alive_refreshes_every_third_of_the_ttl() -> None:
    client = FakeLeases()
    held = lease(client, ttl=1.0)
    task = asyncio.create_task(keep_alive(held))
    await asyncio.sleep(1.6)
    assert held.held and not held.lost.is_set()
    assert client.refreshes >= 3
    await held.release()
    await asyncio.wait_for(task, 5)


async def test_keep_alive_retries_transient_errors_until_the_deadline() -> None:
    client = FakeLeases(unavailable(), forever=True)
    held = lease(client, ttl=1.0)
    task = asyncio.create_task(keep_alive(held))
    await asyncio.wait_for(held.lost.wait(), 5)
    await asyncio.wait_for(task, 5)
    assert client.refreshes >= 3  # tried again every margin (0.1 s) after ttl/3


async def test_keep_alive_stops_at_once_on_not_held() -> None:
    client = FakeLeases(not_held())
    held = lease(client, ttl=30.0, age=10.0)  # first refresh due at once
    await asyncio.wait_for(keep_alive(held), 5)
    assert client.refreshes == 1
    assert held.lost.is_set() and not held.held


async def test_keep_alive_recovers_after_transient_errors() -> None:
    client = FakeLeases(unavailable(), unavailable())
    held = lease(client, ttl=3.0, age=1.0)
    task = asyncio.create_task(keep_alive(held))
    await asyncio.sleep(1.0)  # tries at 0, 0.3 and 0.6 s
    assert client.refreshes >= 3 and held.held
    assert held.remaining > 1.5  # renewed (else about 0.7 s would be left)
    task.cancel()
    await asyncio.wait([task])


class VanishedPrimary(FakeLeases):
    """The first refresh goes to a primary that vanished: no answer until the call's
    deadline. Later ones reach the new primary."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []

    async def refresh(self, lease: Lease, ttl: float | None = None, *,
                      timeout: float | None = None) -> None:
        assert timeout is not None
        self.timeouts.append(timeout)
        if len(self.timeouts) == 1:
            await asyncio.sleep(timeout)
            raise unavailable()
        await super().refresh(lease, ttl, timeout=timeout)


async def test_a_refresh_lost_in_a_partition_leaves_time_for_the_next() -> None:
    client = VanishedPrimary()
    held = lease(client, ttl=1.2, age=0.4)  # first refresh due at once
    task = asyncio.create_task(keep_alive(held))
    await asyncio.sleep(0.9)  # past 0.4 + the lost try, before the deadline (~1.08)
    assert held.held and client.refreshes >= 1
    assert client.timeouts[0] <= attempt_limit(1.2) + 1e-6  # not the whole remaining time
    assert held.remaining > 0.3  # renewed by the second try
    task.cancel()
    await asyncio.wait([task])


# -- the client's calls, against a scripted node --------------------------------------

class FakeMesh:
    """What LockClient uses of a Mesh: one node, no map."""

    def __init__(self, timeout: float = 1.0) -> None:
        self.timeout = timeout
        self.epoch = 0

    async def refresh(self, timeout: float | None = None) -> None:
        pass

    def route(self, service: str, key: str | bytes) -> Target:
        assert service == "lock"
        return Target(ADDRESS, "n1")

    def call_metadata(self) -> None:
        return None


Handler = Callable[[Any, float], Any]


class ScriptedLocks(LockClient):
    """A LockClient whose calls are answered by ``handlers[method](request, budget)``,
    or by the next entry of ``script[method]`` (an exception is raised)."""

    def __init__(self, **script: list[Any] | Handler) -> None:
        super().__init__(cast(Mesh, FakeMesh()))
        self.script = script
        self.sent: list[tuple[str, Any, float]] = []

    async def _rpc(self, address: str, method: str, request: Any, budget: float) -> Any:
        copy = type(request)()
        copy.CopyFrom(request)
        self.sent.append((method, copy, budget))
        answer = self.script[method]
        outcome = answer(copy, budget) if callable(answer) else answer.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def requests(self, method: str) -> list[Any]:
        return [r for m, r, _ in self.sent if m == method]


def granted(lease_id: str = "L1", token: int = 9, ttl: float = 30.0) -> pb.AcquireResponse:
    response = pb.AcquireResponse(lease_id=lease_id, fencing_token=token)
    response.expire_time.FromNanoseconds(int((time.time() + ttl) * 1e9))
    response.ttl.FromNanoseconds(int(ttl * 1e9))
    return response


def refreshed(token: int = 9) -> pb.RefreshResponse:
    response = pb.RefreshResponse(fencing_token=token)
    response.expire_time.FromNanoseconds(int((time.time() + 30) * 1e9))
    return response


async def test_acquire_sends_its_options_and_returns_the_lease() -> None:
    locks = ScriptedLocks(Acquire=[granted(token=77)])
    got = await locks.acquire("orders", ttl=10, wait=2, permits=2, max_permits=3, owner="me")
    assert (got.name, got.lease_id, got.token, got.ttl, got.permits) == ("orders", "L1", 77,
                                                                        10, 2)
    assert got.held and 8.0 < got.remaining <= 9.0
    [(method, request, budget)] = locks.sent
    assert method == "Acquire"
    assert request.name == "orders" and request.owner == "me"
    assert request.ttl.ToNanoseconds() == 10 * 10**9
    assert (request.permits, request.max_permits) == (2, 3)
    assert len(request.request_id) == 32
    wait = request.wait_timeout.ToNanoseconds() / 1e9
    assert 1.5 < wait <= 2.0
    assert budget > wait + 0.5  # the deadline leaves the node time to say LOCK_TIMEOUT


async def test_default_owner_is_host_and_pid() -> None:
    locks = ScriptedLocks(Acquire=[granted()])
    await locks.acquire("orders", ttl=10)
    owner = locks.requests("Acquire")[0].owner
    assert owner.endswith(f":{os.getpid()}") and len(owner) > 2


async def test_acquire_retries_an_unknown_outcome_with_the_same_request_id() -> None:
    locks = ScriptedLocks(Acquire=[unavailable(), unavailable(Reason.GROUP_UNAVAILABLE),
                                   granted()])
    await locks.acquire("orders", ttl=10, wait=5)
    ids = {r.request_id for r in locks.requests("Acquire")}
    waits = [r.wait_timeout.ToNanoseconds() for r in locks.requests("Acquire")]
    assert len(locks.requests("Acquire")) == 3 and len(ids) == 1
    assert waits == sorted(waits, reverse=True)  # later tries wait only for what is left
    # A new acquire() is a new request.
    locks.script["Acquire"] = [granted("L2")]
    await locks.acquire("orders", ttl=10, wait=5)
    assert locks.requests("Acquire")[-1].request_id not in ids


async def test_acquire_without_wait_waits_round_after_round() -> None:
    locks = ScriptedLocks(Acquire=[lock_timeout(), lock_timeout(), granted()])
    await locks.acquire("orders", ttl=10)
    requests = locks.requests("Acquire")
    assert len(requests) == 3 and len({r.request_id for r in requests}) == 1
    assert all(r.wait_timeout.ToNanoseconds() > (FOREVER - 5) * 1e9 for r in requests)
    assert all(budget > FOREVER for _, _, budget in locks.sent)


async def test_acquire_with_wait_gives_up_and_try_acquire_returns_none() -> None:
    locks = ScriptedLocks(Acquire=[lock_timeout(token=5)])
    with pytest.raises(LockTimeoutError) as info:
        await locks.acquire("orders", ttl=10, wait=0.5)
    assert info.value.fencing_token == 5

    locks.script["Acquire"] = [lock_timeout()]
    assert await locks.try_acquire("orders", ttl=10) is None
    assert locks.requests("Acquire")[-1].wait_timeout.ToNanoseconds() == 0

    with pytest.raises(MeshError):
        await locks.acquire("orders", wait=-1)


async def test_a_slow_grant_is_confirmed_by_a_refresh() -> None:
    def slow(request: Any, budget: float) -> pb.AcquireResponse:
        time.sleep(0.5)  # the queue: most of the 1 s ttl may be gone at the reply
        return granted()

    locks = ScriptedLocks(Acquire=slow, Refresh=[refreshed()])
    got = await locks.acquire("orders", ttl=1.0, wait=5)
    assert [m for m, _, _ in locks.sent] == ["Acquire", "Refresh"]
    assert got.held and got.remaining > 0.8  # counted from the refresh

    # If the grant expired meanwhile, it is acquired again (a new request id).
    locks = ScriptedLocks(Acquire=slow, Refresh=[not_held(), refreshed()])
    got = await locks.acquire("orders", ttl=1.0, wait=5)
    assert got.held
    assert len({r.request_id for r in locks.requests("Acquire")}) == 2


async def test_the_default_ttl_is_the_one_the_node_reports() -> None:
    locks = ScriptedLocks(Acquire=[granted(ttl=12.5)])
    got = await locks.acquire("orders")
    assert not locks.requests("Acquire")[0].HasField("ttl")
    assert got.ttl == pytest.approx(12.5)
    assert [m for m, _, _ in locks.sent] == ["Acquire"]


async def test_refresh_not_held_loses_the_lease() -> None:
    locks = ScriptedLocks(Acquire=[granted()], Refresh=[refreshed(), not_held()])
    got = await locks.acquire("orders", ttl=10)
    await got.refresh(ttl=20)
    assert got.ttl == 20 and locks.requests("Refresh")[0].ttl.ToNanoseconds() == 20 * 10**9
    assert got.remaining > 18
    with pytest.raises(LockNotHeldError):
        await got.refresh()
    assert got.lost.is_set() and not got.held
    with pytest.raises(LockLostError):  # no call for a lease known lost
        await got.refresh()
    assert len(locks.requests("Refresh")) == 2


async def test_release_after_an_unknown_outcome_takes_not_held_as_released() -> None:
    locks = ScriptedLocks(Acquire=[granted()], Release=[unavailable(), not_held()])
    got = await locks.acquire("orders", ttl=10)
    await got.release()
    assert got.released and not got.held and not got.lost.is_set()
    await got.release()  # idempotent: nothing sent
    assert len(locks.requests("Release")) == 2


async def test_release_of_a_lease_the_node_dropped_reports_the_loss() -> None:
    locks = ScriptedLocks(Acquire=[granted()], Release=[not_held()])
    got = await locks.acquire("orders", ttl=10)
    with pytest.raises(LockNotHeldError):
        await got.release()
    assert got.lost.is_set() and got.released
    await got.release()
    assert len(locks.requests("Release")) == 1


async def test_release_failing_for_good_keeps_the_lease() -> None:
    locks = ScriptedLocks(Acquire=[granted()], Release=lambda r, b: UnavailableError(
        "down", code=grpc.StatusCode.UNAVAILABLE, reason="SHUTTING_DOWN"))
    got = await locks.acquire("orders", ttl=10, timeout=0.3)
    with pytest.raises(UnavailableError):
        await got.release(timeout=0.3)
    assert got.held and not got.released
