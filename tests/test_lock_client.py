"""Every lock call against a real node process, through the typed client."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable

import pytest

from clients import (
    FailedPreconditionError,
    InvalidArgumentError,
    Lease,
    LockInfo,
    LockLostError,
    LockNotHeldError,
    LockTimeoutError,
    Mesh,
)
from clients.sync import SyncMesh
from common.localmesh import LocalMesh

Connect = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def mesh(shared_node: LocalMesh, mesh_client: Connect) -> Mesh:
    return await mesh_client(cluster=shared_node.cluster)


def twin(lease: Lease) -> Lease:
    """Another handle on the same lease, as a second party that learned its id would have."""
    return Lease(lease._client, lease.name, lease.lease_id, lease.token, lease.ttl,
                 lease.permits, lease.expire_time, time.monotonic())


async def made_twin(lease: Lease) -> Lease:
    return twin(lease)  # a lease is made on the client's event loop


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_acquire_describe_validate_release(mesh: Mesh) -> None:
    name = "basic:lock"
    free = await mesh.locks.describe(name)
    assert free == LockInfo(name, [], [], 1, 1, free.fencing_token)

    lease = await mesh.locks.acquire(name, ttl=5.0)
    assert lease.held and lease.token > 0 and lease.ttl == 5.0 and lease.permits == 1
    assert lease.lease_id
    assert lease.expire_time > time.time()
    info = await mesh.locks.describe(name)
    [holder] = info.holders
    assert holder.lease_id == lease.lease_id and holder.fencing_token == lease.token
    assert holder.owner == f"{socket.gethostname()[:200]}:{os.getpid()}"
    assert holder.permits == 1 and holder.expire_time > holder.acquire_time
    assert (info.max_permits, info.available_permits, info.waiters) == (1, 0, [])
    assert info.fencing_token >= lease.token
    assert await mesh.locks.validate(name, lease.token) is True
    assert await mesh.locks.validate(name, lease.token + 1) is False

    await lease.release()
    assert not lease.held and not lease.lost.is_set()
    await lease.release()  # again: nothing happens
    assert (await mesh.locks.describe(name)).holders == []
    assert await mesh.locks.validate(name, lease.token) is False

    again = await mesh.locks.acquire(name, ttl=5.0, owner="second")
    assert again.token > lease.token
    assert (await mesh.locks.describe(name)).holders[0].owner == "second"
    await again.release()


async def test_try_acquire_and_timeout_when_held(mesh: Mesh) -> None:
    name = "busy:lock"
    lease = await mesh.locks.acquire(name, ttl=10.0)
    assert await mesh.locks.try_acquire(name, ttl=10.0) is None

    start = time.monotonic()
    with pytest.raises(LockTimeoutError) as info:
        await mesh.locks.acquire(name, ttl=10.0, wait=0.5)
    assert time.monotonic() - start >= 0.4
    assert info.value.reason == "LOCK_TIMEOUT"
    assert info.value.fencing_token >= lease.token
    assert (await mesh.locks.describe(name)).waiters == []  # no longer queued

    await lease.release()
    got = await mesh.locks.try_acquire(name, ttl=10.0)
    assert got is not None and got.token > lease.token
    await got.release()


async def test_waiter_is_served_when_the_holder_releases(mesh: Mesh) -> None:
    name = "queue:lock"
    lease = await mesh.locks.acquire(name, ttl=10.0)
    waiting = asyncio.create_task(mesh.locks.acquire(name, ttl=10.0, wait=20.0, owner="w"))

    async def queued() -> bool:
        return [w.owner for w in (await mesh.locks.describe(name)).waiters] == ["w"]

    await until(queued)
    waiter = (await mesh.locks.describe(name)).waiters[0]
    assert waiter.permits == 1 and waiter.give_up_time > waiter.since
    assert not waiting.done()
    await lease.release()
    second = await asyncio.wait_for(waiting, 10)
    assert second.held and second.token > lease.token
    await second.release()


async def test_cancelled_acquire_leaves_the_queue(mesh: Mesh) -> None:
    name = "cancel:lock"
    lease = await mesh.locks.acquire(name, ttl=10.0)
    waiting = asyncio.create_task(mesh.locks.acquire(name, ttl=10.0, owner="quitter"))

    async def queued() -> bool:
        return len((await mesh.locks.describe(name)).waiters) == 1

    async def gone() -> bool:
        return (await mesh.locks.describe(name)).waiters == []

    await until(queued)
    waiting.cancel()
    await asyncio.wait([waiting])
    await until(gone)
    await lease.release()
    assert (await mesh.locks.describe(name)).holders == []


async def test_context_manager_refreshes_past_the_ttl(mesh: Mesh) -> None:
    name = "cm:lock"
    # A 3 s ttl: its refreshes (every second, each try allowed 0.5 s) ride out a
    # slow node on a loaded machine, which a 1 s ttl's 0.2 s tries do not.
    async with mesh.lock(name, ttl=3.0) as lease:
        first_expiry = lease.expire_time  # the node's stamp, its wall clock
        await asyncio.sleep(max(0.0, first_expiry - time.time()) + 0.5)
        assert time.time() > first_expiry  # past the ttl it was granted with
        assert lease.held and not lease.lost.is_set()
        lease.check()
        [holder] = (await mesh.locks.describe(name)).holders
        assert holder.lease_id == lease.lease_id and holder.fencing_token == lease.token
        assert await mesh.locks.validate(name, lease.token)
    assert lease.released and not lease.lost.is_set()
    assert (await mesh.locks.describe(name)).holders == []


async def test_context_manager_releases_when_the_block_raises(mesh: Mesh) -> None:
    name = "cm:raise"
    with pytest.raises(RuntimeError, match="inside"):
        async with mesh.lock(name, ttl=5.0):
            raise RuntimeError("inside")
    assert (await mesh.locks.describe(name)).holders == []


async def test_refresh_of_a_lease_released_behind_its_back(mesh: Mesh) -> None:
    name = "stolen:lock"
    lease = await mesh.locks.acquire(name, ttl=10.0)
    await mesh.locks.release(twin(lease))
    with pytest.raises(LockNotHeldError):
        await lease.refresh()
    assert lease.lost.is_set() and lease.lost_reason and not lease.held
    with pytest.raises(LockLostError):
        lease.check()
    await lease.release()  # the loss is known: nothing more to report
    assert lease.released


async def test_release_reports_a_loss_nobody_noticed(mesh: Mesh) -> None:
    name = "unnoticed:lock"
    lease = await mesh.locks.acquire(name, ttl=10.0)
    await twin(lease).release()
    with pytest.raises(LockNotHeldError):
        await lease.release()
    assert lease.lost.is_set()


async def test_context_manager_raises_when_the_lease_was_lost(mesh: Mesh) -> None:
    name = "cm:lost"
    seen: list[Lease] = []
    with pytest.raises(LockLostError):
        async with mesh.lock(name, ttl=3.0, on_lost=seen.append) as lease:
            await twin(lease).release()
            # The next background refresh (ttl/3 after the grant) finds it gone.
            await asyncio.wait_for(lease.lost.wait(), 10)
            assert not lease.held
    assert seen == [lease]


async def test_unrefreshed_lease_is_lost_locally_before_the_node_expires_it(mesh: Mesh) -> None:
    name = "expire:lock"
    lease = await mesh.locks.acquire(name, ttl=1.0)
    await asyncio.wait_for(lease.lost.wait(), 5)

    # Presumed lost at (send + ttl - margin): the node may still hold it a moment.
    async def expired() -> bool:
        return not await mesh.locks.validate(name, lease.token)

    await until(expired)
    with pytest.raises(LockLostError):
        await lease.refresh()
    await lease.release()  # NOT_HELD is expected of a lease known to be lost
    nxt = await mesh.locks.try_acquire(name, ttl=5.0)
    assert nxt is not None and nxt.token > lease.token
    await nxt.release()


async def test_default_ttl_is_the_nodes(mesh: Mesh) -> None:
    before = time.monotonic()
    lease = await mesh.locks.acquire("default:ttl")
    after = time.monotonic()
    assert lease.ttl == pytest.approx(30.0)
    # Presumed lost a margin (1 s) before the ttl runs out, counted from the send.
    assert before + 29.0 <= lease.deadline <= after + 29.0
    assert lease.remaining <= 29.0
    await lease.release()


async def test_refresh_with_a_new_ttl(mesh: Mesh) -> None:
    name = "refresh:lock"
    lease = await mesh.locks.acquire(name, ttl=2.0)
    token, before = lease.token, lease.expire_time
    await lease.refresh(ttl=20.0)
    assert lease.ttl == 20.0 and lease.token == token and lease.expire_time > before + 10
    assert lease.remaining > 15
    [holder] = (await mesh.locks.describe(name)).holders
    assert holder.fencing_token == token and holder.expire_time > time.time() + 15
    await lease.release()


async def test_semaphore_allows_max_permits_holders(mesh: Mesh) -> None:
    name = "sem:lock"
    first = await mesh.locks.acquire(name, ttl=10.0, max_permits=2)
    second = await mesh.locks.acquire(name, ttl=10.0, max_permits=2, wait=0)
    assert second.token > first.token
    assert await mesh.locks.try_acquire(name, ttl=10.0, max_permits=2) is None
    info = await mesh.locks.describe(name)
    assert (info.max_permits, info.available_permits) == (2, 0)
    assert [h.lease_id for h in info.holders] == [first.lease_id, second.lease_id]
    assert await mesh.locks.validate(name, first.token)
    assert await mesh.locks.validate(name, second.token)

    with pytest.raises(FailedPreconditionError) as mismatch:
        await mesh.locks.try_acquire(name, ttl=10.0, max_permits=3)
    assert mismatch.value.reason == "PERMITS_MISMATCH"
    assert mismatch.value.metadata["max_permits"] == "2"

    await first.release()
    both = await mesh.locks.try_acquire(name, ttl=10.0, max_permits=2)
    assert both is not None
    await both.release()
    await second.release()
    big = await mesh.locks.acquire(name, ttl=10.0, permits=2, max_permits=2, wait=5)
    assert big.permits == 2 and (await mesh.locks.describe(name)).available_permits == 0
    await big.release()


async def test_bad_arguments_name_the_field(mesh: Mesh) -> None:
    with pytest.raises(InvalidArgumentError) as empty:
        await mesh.locks.acquire("", ttl=5.0, wait=0)
    assert "name" in empty.value.field_violations
    with pytest.raises(InvalidArgumentError) as short:
        await mesh.locks.acquire("bad:ttl", ttl=0.1, wait=0)
    assert "ttl" in short.value.field_violations
    with pytest.raises(InvalidArgumentError) as permits:
        await mesh.locks.acquire("bad:permits", ttl=5.0, permits=3, max_permits=2, wait=0)
    assert permits.value.field_violations
    with pytest.raises(InvalidArgumentError):
        await mesh.locks.acquire("bad:wait", ttl=5.0, wait=-1)


def test_sync_wrapper(shared_node: LocalMesh) -> None:
    name = "sync:lock"
    with SyncMesh(etcd=shared_node.etcd_endpoint, cluster=shared_node.cluster) as mesh:
        with mesh.lock(name, ttl=3.0) as lease:  # 3 s: refreshes ride out a slow node
            # Refreshed on the client's loop thread meanwhile, past its first expiry.
            time.sleep(max(0.0, lease.expire_time - time.time()) + 0.5)
            assert lease.held
            lease.check()
            [holder] = mesh.locks.describe(name).holders
            assert holder.lease_id == lease.lease_id
            assert mesh.locks.try_acquire(name, ttl=5.0) is None
        assert mesh.locks.describe(name).holders == []

        got = mesh.locks.acquire(name, ttl=5.0, wait=1.0)
        assert got.token > lease.token and mesh.locks.validate(name, got.token)
        mesh.locks.refresh(got, 10.0)
        assert got.ttl == 10.0
        with pytest.raises(LockTimeoutError):
            mesh.locks.acquire(name, ttl=5.0, wait=0.2)
        mesh.locks.release(got)
        assert not got.held and not mesh.locks.validate(name, got.token)

        with pytest.raises(LockLostError), mesh.lock(name, ttl=3.0) as lost:
            mesh.locks.release(mesh._loop.run(made_twin(lost)))
            assert mesh.locks.describe(name).holders == []
            deadline = time.monotonic() + 10
            while lost.held:
                assert time.monotonic() < deadline
                time.sleep(0.05)


async def test_readers_share_and_a_writer_waits_for_them(mesh: Mesh) -> None:
    async with mesh.lock("client:rw", ttl=10, shared=True) as first, \
            mesh.lock("client:rw", ttl=10, shared=True) as second:
        assert second.token > first.token
        assert await mesh.locks.try_acquire("client:rw") is None
        info = await mesh.locks.describe("client:rw")
        assert [h.shared for h in info.holders] == [True, True]
        writer = asyncio.create_task(mesh.locks.acquire("client:rw", ttl=10, wait=10))
        await until(lambda: _waiters(mesh, "client:rw", 1))
        assert not writer.done()
    lease = await writer
    assert lease.token > second.token
    await lease.release()


async def _waiters(mesh: Mesh, name: str, count: int) -> bool:
    return len((await mesh.locks.describe(name)).waiters) == count


def _lock_calls(local: LocalMesh) -> dict[str, float]:
    """Lock RPCs served by ``local``'s nodes, by method name (from /metrics)."""
    calls: dict[str, float] = {}
    for node in local.nodes:
        text = scrape_text(node.metrics)
        for line in text.splitlines():
            if line.startswith("mesh_rpc_requests_total{") and "LockService/" in line:
                method = line.split("LockService/", 1)[1].split('"', 1)[0]
                calls[method] = calls.get(method, 0.0) + float(line.rsplit(" ", 1)[1])
    return calls


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def test_concurrent_cycles_travel_in_batches(local_mesh: Callable[..., LocalMesh],
                                                   mesh_client: Connect) -> None:
    """Acquires and releases made together for one node share AcquireBatch and
    ReleaseBatch calls; each caller still gets its own lease (distinct tokens) and
    every lock ends free."""
    local = local_mesh(2, replicas=1)
    mesh = await mesh_client()
    await (await mesh.locks.acquire("batched:warm", ttl=10)).release()
    before = await asyncio.to_thread(_lock_calls, local)
    names = [f"batched:{i}" for i in range(32)]

    async def cycles(name: str) -> list[int]:
        tokens = []
        for _ in range(5):
            lease = await mesh.locks.acquire(name, ttl=10, wait=10)
            tokens.append(lease.token)
            await lease.release()
        return tokens

    tokens = await asyncio.gather(*(cycles(name) for name in names))
    after = await asyncio.to_thread(_lock_calls, local)
    moved = {m: after[m] - before.get(m, 0.0) for m in after}
    print(f"\n{len(names)} x 5 cycles: {moved}")
    assert all(len(set(t)) == 5 and t == sorted(t) for t in tokens)  # tokens grow per lock
    assert moved.get("AcquireBatch", 0) > 0 and moved.get("ReleaseBatch", 0) > 0
    calls = sum(moved.get(m, 0) for m in ("Acquire", "AcquireBatch", "Release",
                                          "ReleaseBatch"))
    assert calls < 2 * 5 * len(names)  # fewer calls than acquires and releases
    for name in names:
        info = await mesh.locks.describe(name)
        assert not info.holders and not info.waiters


async def test_coalesced_acquires_of_one_lock_wait_their_turn(mesh: Mesh) -> None:
    """Acquires of a held lock batched together do not wait in the batch: each
    goes on alone and waits its turn; the lock is never held twice."""
    held = 0
    most = 0

    async def worker() -> None:
        nonlocal held, most
        async with mesh.lock("batched:one", ttl=10, wait=20):
            held += 1
            most = max(most, held)
            await asyncio.sleep(0.01)
            held -= 1

    await asyncio.gather(*(worker() for _ in range(12)))
    assert most == 1
    info = await mesh.locks.describe("batched:one")
    assert not info.holders and not info.waiters


async def test_without_coalescing_every_call_goes_alone(
        shared_node: LocalMesh, mesh_client: Connect) -> None:
    mesh = await mesh_client(cluster=shared_node.cluster, coalesce=False)
    before = await asyncio.to_thread(_lock_calls, shared_node)
    leases = await asyncio.gather(*(mesh.locks.acquire(f"alone:{i}", ttl=10)
                                    for i in range(8)))
    await asyncio.gather(*(lease.release() for lease in leases))
    after = await asyncio.to_thread(_lock_calls, shared_node)
    assert after.get("AcquireBatch", 0) == before.get("AcquireBatch", 0)
    assert after["Acquire"] - before.get("Acquire", 0) == 8
