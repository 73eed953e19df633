"""LockService over the wire, against a real node, with the raw generated stub:
what any gRPC language sees (codes, reasons, named fields, FIFO, expiry)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from common.localmesh import LocalMesh
from mesh.lock.v1 import lock_pb2 as pb
from mesh.lock.v1 import lock_pb2_grpc as pb_grpc
from tests.cluster import error_details


def _d(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d




@pytest.fixture
async def stub(shared_node: LocalMesh) -> AsyncIterator[pb_grpc.LockServiceStub]:
    async with grpc.aio.insecure_channel(shared_node.nodes[0].address) as channel:
        yield pb_grpc.LockServiceStub(channel)


async def _acquire(stub: pb_grpc.LockServiceStub, name: str, *, ttl: float = 10.0,
                   wait: float = 0.0, owner: str = "", permits: int = 0,
                   max_permits: int = 0, request_id: str = "",
                   mode: pb.LockMode.ValueType = pb.LOCK_MODE_UNSPECIFIED
                   ) -> pb.AcquireResponse:
    response: pb.AcquireResponse = await stub.Acquire(
        pb.AcquireRequest(name=name, owner=owner, ttl=_d(ttl), wait_timeout=_d(wait),
                          permits=permits, max_permits=max_permits, request_id=request_id,
                          mode=mode),
        timeout=wait + 5.0)
    return response


async def _queued(stub: pb_grpc.LockServiceStub, name: str, count: int) -> None:
    """Wait until ``name`` has ``count`` waiters."""
    deadline = time.monotonic() + 5
    while True:
        described = await stub.Describe(pb.DescribeRequest(name=name))
        if len(described.waiters) == count:
            return
        assert time.monotonic() < deadline, f"{name}: {len(described.waiters)} waiters"
        await asyncio.sleep(0.01)


async def _error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_acquire_release_and_tokens_grow(stub: pb_grpc.LockServiceStub) -> None:
    first = await _acquire(stub, "rpc:basic", owner="me")
    assert first.lease_id and first.fencing_token > 0
    assert first.expire_time.ToSeconds() > time.time() + 5
    await stub.Release(pb.ReleaseRequest(name="rpc:basic", lease_id=first.lease_id))
    second = await _acquire(stub, "rpc:basic")
    assert second.fencing_token > first.fencing_token
    await stub.Release(pb.ReleaseRequest(name="rpc:basic", lease_id=second.lease_id))


async def test_try_lock_when_held_is_lock_timeout(stub: pb_grpc.LockServiceStub) -> None:
    held = await _acquire(stub, "rpc:try")
    error = await _error(_acquire(stub, "rpc:try"))
    reason, metadata, _ = error_details(error)
    assert error.code() == grpc.StatusCode.ABORTED and reason == "LOCK_TIMEOUT"
    assert metadata["fencing_token"] == str(held.fencing_token)
    assert metadata["waiters"] == "0"


async def test_wait_timeout_leaves_the_queue(stub: pb_grpc.LockServiceStub) -> None:
    await _acquire(stub, "rpc:wait")
    started = time.monotonic()
    error = await _error(_acquire(stub, "rpc:wait", wait=0.3))
    assert error_details(error)[0] == "LOCK_TIMEOUT"
    assert time.monotonic() - started >= 0.3
    described = await stub.Describe(pb.DescribeRequest(name="rpc:wait"))
    assert len(described.holders) == 1 and not described.waiters


async def test_waiters_are_served_in_arrival_order(stub: pb_grpc.LockServiceStub) -> None:
    held = await _acquire(stub, "rpc:fifo")
    granted: list[str] = []

    async def wait(owner: str) -> None:
        lease = await _acquire(stub, "rpc:fifo", owner=owner, wait=10.0)
        granted.append(owner)
        await stub.Release(pb.ReleaseRequest(name="rpc:fifo", lease_id=lease.lease_id))

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(wait(f"w{i}")))
        await _queued(stub, "rpc:fifo", i + 1)
    described = await stub.Describe(pb.DescribeRequest(name="rpc:fifo"))
    assert [w.owner for w in described.waiters] == [f"w{i}" for i in range(5)]
    await stub.Release(pb.ReleaseRequest(name="rpc:fifo", lease_id=held.lease_id))
    await asyncio.gather(*tasks)
    assert granted == [f"w{i}" for i in range(5)]


async def test_cancelled_waiter_leaves_the_queue(stub: pb_grpc.LockServiceStub) -> None:
    held = await _acquire(stub, "rpc:cancel")
    call = stub.Acquire(pb.AcquireRequest(name="rpc:cancel", owner="quitter",
                                          wait_timeout=_d(30)), timeout=35)
    await _queued(stub, "rpc:cancel", 1)
    call.cancel()
    await _queued(stub, "rpc:cancel", 0)
    await stub.Release(pb.ReleaseRequest(name="rpc:cancel", lease_id=held.lease_id))
    described = await stub.Describe(pb.DescribeRequest(name="rpc:cancel"))
    assert not described.holders  # nothing was granted to the departed waiter


async def test_expiry_releases_and_wakes_the_next_waiter(
        stub: pb_grpc.LockServiceStub) -> None:
    first = await _acquire(stub, "rpc:expiry", ttl=1.0)
    second = await _acquire(stub, "rpc:expiry", wait=5.0)
    # By the node's own stamps, not by how fast the calls came back: the waiter is
    # granted (its expire_time less its ttl) never before the first lease ran out,
    # and soon after (the upper bound leaves room for a loaded machine).
    expired = first.expire_time.ToNanoseconds()
    granted = second.expire_time.ToNanoseconds() - second.ttl.ToNanoseconds()
    assert expired <= granted < expired + 2_000_000_000, (granted - expired) / 1e9
    assert second.fencing_token > first.fencing_token
    error = await _error(stub.Refresh(pb.RefreshRequest(name="rpc:expiry",
                                                        lease_id=first.lease_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(error)[0] == "LOCK_NOT_HELD"


async def test_refresh_extends_and_keeps_the_token(stub: pb_grpc.LockServiceStub) -> None:
    # Refreshed every 0.6 s, a 1.5 s lease outlives its first expiry; the gaps leave
    # room for a slow call on a loaded machine.
    lease = await _acquire(stub, "rpc:refresh", ttl=1.5)
    expire = lease.expire_time.ToNanoseconds()
    for _ in range(3):
        await asyncio.sleep(0.6)
        refreshed = await stub.Refresh(pb.RefreshRequest(name="rpc:refresh",
                                                         lease_id=lease.lease_id))
        assert refreshed.fencing_token == lease.fencing_token
        assert refreshed.expire_time.ToNanoseconds() > expire  # extended from now
        expire = refreshed.expire_time.ToNanoseconds()
    assert time.time_ns() > lease.expire_time.ToNanoseconds()  # held past its first expiry
    longer = await stub.Refresh(pb.RefreshRequest(name="rpc:refresh", lease_id=lease.lease_id,
                                                  ttl=_d(60)))
    assert longer.expire_time.ToSeconds() > time.time() + 50
    described = await stub.Describe(pb.DescribeRequest(name="rpc:refresh"))
    assert [h.lease_id for h in described.holders] == [lease.lease_id]


async def test_validate(stub: pb_grpc.LockServiceStub) -> None:
    lease = await _acquire(stub, "rpc:validate")
    ok = await stub.Validate(pb.ValidateRequest(name="rpc:validate",
                                                fencing_token=lease.fencing_token))
    assert ok.valid and ok.current_token == lease.fencing_token
    stale = await stub.Validate(pb.ValidateRequest(name="rpc:validate",
                                                   fencing_token=lease.fencing_token - 1))
    assert not stale.valid
    await stub.Release(pb.ReleaseRequest(name="rpc:validate", lease_id=lease.lease_id))
    gone = await stub.Validate(pb.ValidateRequest(name="rpc:validate",
                                                  fencing_token=lease.fencing_token))
    assert not gone.valid and gone.current_token == 0


async def test_semaphore_permits(stub: pb_grpc.LockServiceStub) -> None:
    a = await _acquire(stub, "rpc:sem", permits=2, max_permits=3)
    b = await _acquire(stub, "rpc:sem", permits=1, max_permits=3)
    assert b.fencing_token > a.fencing_token
    error = await _error(_acquire(stub, "rpc:sem", permits=1, max_permits=3))
    assert error_details(error)[0] == "LOCK_TIMEOUT"
    mismatch = await _error(_acquire(stub, "rpc:sem", max_permits=2))
    reason, metadata, _ = error_details(mismatch)
    assert mismatch.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason == "PERMITS_MISMATCH" and metadata["max_permits"] == "3"
    described = await stub.Describe(pb.DescribeRequest(name="rpc:sem"))
    assert described.max_permits == 3 and described.available_permits == 0
    # The head of the queue wants 2: a later request for 1 waits behind it.
    big = asyncio.create_task(_acquire(stub, "rpc:sem", permits=2, max_permits=3, wait=10))
    await _queued(stub, "rpc:sem", 1)
    small = asyncio.create_task(_acquire(stub, "rpc:sem", permits=1, max_permits=3, wait=10))
    await _queued(stub, "rpc:sem", 2)
    await stub.Release(pb.ReleaseRequest(name="rpc:sem", lease_id=b.lease_id))
    await asyncio.sleep(0.2)
    assert not big.done() and not small.done()
    await stub.Release(pb.ReleaseRequest(name="rpc:sem", lease_id=a.lease_id))
    big_lease, small_lease = await asyncio.gather(big, small)
    assert small_lease.fencing_token > big_lease.fencing_token


async def test_read_write_lock(stub: pb_grpc.LockServiceStub) -> None:
    shared = pb.LOCK_MODE_SHARED
    r1 = await _acquire(stub, "rpc:rw", mode=shared, owner="r1")
    r2 = await _acquire(stub, "rpc:rw", mode=shared, owner="r2")
    busy = await _error(_acquire(stub, "rpc:rw", mode=pb.LOCK_MODE_EXCLUSIVE))
    assert error_details(busy)[0] == "LOCK_TIMEOUT"
    described = await stub.Describe(pb.DescribeRequest(name="rpc:rw"))
    assert [h.mode for h in described.holders] == [shared, shared]
    assert described.available_permits == 0
    writer = asyncio.create_task(_acquire(stub, "rpc:rw", wait=10, owner="w"))
    await _queued(stub, "rpc:rw", 1)
    reader = asyncio.create_task(_acquire(stub, "rpc:rw", wait=10, mode=shared, owner="r3"))
    await _queued(stub, "rpc:rw", 2)
    for lease in (r1, r2):
        await stub.Release(pb.ReleaseRequest(name="rpc:rw", lease_id=lease.lease_id))
    w = await writer
    assert not reader.done()
    await stub.Release(pb.ReleaseRequest(name="rpc:rw", lease_id=w.lease_id))
    assert (await reader).fencing_token > w.fencing_token > r2.fencing_token


async def test_retried_acquire_with_request_id_gets_the_same_lease(
        stub: pb_grpc.LockServiceStub) -> None:
    first = await _acquire(stub, "rpc:idem", request_id="req-1")
    again = await _acquire(stub, "rpc:idem", request_id="req-1")
    assert (again.lease_id, again.fencing_token) == (first.lease_id, first.fencing_token)
    other = await _error(_acquire(stub, "rpc:idem", request_id="req-2"))
    assert error_details(other)[0] == "LOCK_TIMEOUT"


async def test_wrong_lease_is_lock_not_held(stub: pb_grpc.LockServiceStub) -> None:
    await _acquire(stub, "rpc:wrong")
    for call in (stub.Release(pb.ReleaseRequest(name="rpc:wrong", lease_id="nope")),
                 stub.Refresh(pb.RefreshRequest(name="rpc:wrong", lease_id="nope")),
                 stub.Release(pb.ReleaseRequest(name="rpc:never-used", lease_id="nope"))):
        error = await _error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(error)[0] == "LOCK_NOT_HELD"


@pytest.mark.parametrize(("request_", "field"), [
    (pb.AcquireRequest(name=""), "name"),
    (pb.AcquireRequest(name="x" * 1025), "name"),
    (pb.AcquireRequest(name="n", owner="o" * 257), "owner"),
    (pb.AcquireRequest(name="n", ttl=_d(0.5)), "ttl"),
    (pb.AcquireRequest(name="n", ttl=_d(3601)), "ttl"),
    (pb.AcquireRequest(name="n", ttl=duration_pb2.Duration(seconds=-1)), "ttl"),
    (pb.AcquireRequest(name="n", wait_timeout=duration_pb2.Duration(seconds=-1)),
     "wait_timeout"),
    (pb.AcquireRequest(name="n", permits=2), "permits"),
    (pb.AcquireRequest(name="n", request_id="r" * 65), "request_id"),
    (pb.AcquireRequest(name="n", mode=pb.LOCK_MODE_SHARED, max_permits=2), "mode"),
    (pb.AcquireRequest(name="n", mode=7), "mode"),  # type: ignore[arg-type]
])
async def test_bad_acquire_names_the_field(stub: pb_grpc.LockServiceStub,
                                           request_: pb.AcquireRequest, field: str) -> None:
    error = await _error(stub.Acquire(request_, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(error)[2]


async def test_bad_refresh_ttl_and_empty_names(stub: pb_grpc.LockServiceStub) -> None:
    error = await _error(stub.Refresh(pb.RefreshRequest(name="n", lease_id="l",
                                                        ttl=_d(7200))))
    assert "ttl" in error_details(error)[2]
    for call in (stub.Release(pb.ReleaseRequest(name="")),
                 stub.Describe(pb.DescribeRequest(name="")),
                 stub.Validate(pb.ValidateRequest(name=""))):
        error = await _error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "name" in error_details(error)[2]


async def test_the_node_lease_limit_is_resource_exhausted(local_mesh: Any) -> None:
    local = local_mesh(1, extra=["--lock-max-leases", "2"])
    async with grpc.aio.insecure_channel(local.nodes[0].address) as channel:
        stub = pb_grpc.LockServiceStub(channel)
        first = await _acquire(stub, "limit:a")
        await _acquire(stub, "limit:b")
        error = await _error(_acquire(stub, "limit:c"))
        reason, metadata, _ = error_details(error)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason == "TOO_MANY_LEASES" and metadata["limit"] == "2"
        await stub.Release(pb.ReleaseRequest(name="limit:a", lease_id=first.lease_id))
        assert (await _acquire(stub, "limit:c")).fencing_token > 0


async def test_acquire_batch_answers_each_request_on_its_own(
        stub: pb_grpc.LockServiceStub) -> None:
    held = await _acquire(stub, "batch:held")
    request = pb.AcquireBatchRequest(requests=[
        pb.AcquireRequest(name="batch:a", ttl=_d(10), request_id="ra"),
        pb.AcquireRequest(name="", ttl=_d(10)),
        pb.AcquireRequest(name="batch:held", ttl=_d(10), wait_timeout=_d(30)),  # never waits
        pb.AcquireRequest(name="batch:b", ttl=_d(10)),
    ])
    r = await stub.AcquireBatch(request, timeout=5)
    a, bad, taken, b = r.outcomes
    assert a.granted.lease_id and b.granted.lease_id
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.error.field == "requests[1].name" and "requests[1].name" in bad.error.message
    assert taken.error.reason == "LOCK_TIMEOUT"
    # The request id holds in a batch as in Acquire: the same lease again.
    again = await stub.AcquireBatch(pb.AcquireBatchRequest(requests=[request.requests[0]]))
    assert again.outcomes[0].granted.lease_id == a.granted.lease_id
    described = await stub.Describe(pb.DescribeRequest(name="batch:a"))
    assert [h.lease_id for h in described.holders] == [a.granted.lease_id]

    released = await stub.ReleaseBatch(pb.ReleaseBatchRequest(requests=[
        pb.ReleaseRequest(name="batch:a", lease_id=a.granted.lease_id),
        pb.ReleaseRequest(name="batch:b", lease_id="not-a-lease"),
        pb.ReleaseRequest(name="batch:held", lease_id=held.lease_id),
        pb.ReleaseRequest(name="batch:b", lease_id=b.granted.lease_id),
    ]), timeout=5)
    ok, wrong, ok_held, ok_b = released.outcomes
    assert not ok.HasField("error") and not ok_held.HasField("error")
    assert not ok_b.HasField("error")
    assert wrong.error.reason == "LOCK_NOT_HELD"
    for name in ("batch:a", "batch:b", "batch:held"):
        assert not (await stub.Describe(pb.DescribeRequest(name=name))).holders


async def test_an_empty_or_oversized_batch_is_invalid(stub: pb_grpc.LockServiceStub) -> None:
    error = await _error(stub.AcquireBatch(pb.AcquireBatchRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests" in error_details(error)[2]
    many = [pb.ReleaseRequest(name=f"n{i}", lease_id="x") for i in range(1001)]
    error = await _error(stub.ReleaseBatch(pb.ReleaseBatchRequest(requests=many)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_batch_sent_to_one_node_reaches_every_owner(local_mesh: Any) -> None:
    """Locks led by another node go on to it, one batch per owner: each gets its
    own lease (a client with a stale map still gets answers, and HTTP callers
    need not know owners)."""
    local = local_mesh(2, replicas=1)
    names = [f"spread:{i}" for i in range(20)]
    async with grpc.aio.insecure_channel(local.nodes[0].address) as channel:
        stub = pb_grpc.LockServiceStub(channel)
        r = await stub.AcquireBatch(pb.AcquireBatchRequest(
            requests=[pb.AcquireRequest(name=n, ttl=_d(10)) for n in names]), timeout=10)
        assert all(o.HasField("granted") for o in r.outcomes), r
        for name, outcome in zip(names, r.outcomes, strict=True):
            described = await stub.Describe(pb.DescribeRequest(name=name))
            assert [h.lease_id for h in described.holders] == [outcome.granted.lease_id]
        released = await stub.ReleaseBatch(pb.ReleaseBatchRequest(requests=[
            pb.ReleaseRequest(name=n, lease_id=o.granted.lease_id)
            for n, o in zip(names, r.outcomes, strict=True)]), timeout=10)
        assert not any(o.HasField("error") for o in released.outcomes), released
    async with grpc.aio.insecure_channel(local.nodes[1].address) as channel:
        stub = pb_grpc.LockServiceStub(channel)
        for name in names:
            assert not (await stub.Describe(pb.DescribeRequest(name=name))).holders


async def test_a_batch_whose_caller_left_before_its_commit_ends_its_grants(
        local_mesh: Any) -> None:
    """A batch cancelled while its grants wait for their replica (here: paused)
    never hands them out, so they must not stay held: each is ended once the
    replica is back, for the locks led by the entry node and those it forwarded."""
    local = local_mesh(2, replicas=1)
    names = [f"left:{i}" for i in range(12)]
    replica = local.nodes[1].pid
    async with grpc.aio.insecure_channel(local.nodes[0].address) as channel:
        stub = pb_grpc.LockServiceStub(channel)
        os.kill(replica, signal.SIGSTOP)
        try:
            error = await _error(stub.AcquireBatch(pb.AcquireBatchRequest(
                requests=[pb.AcquireRequest(name=n, ttl=_d(120)) for n in names]),
                timeout=1.0))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            os.kill(replica, signal.SIGCONT)
        deadline = time.monotonic() + 10
        for name in names:
            while (await stub.Describe(pb.DescribeRequest(name=name), timeout=5)).holders:
                assert time.monotonic() < deadline, f"{name} is still held"
                await asyncio.sleep(0.05)
