"""Pure logic of the scheduler client and its worker pool: error mapping, what the
calls send and when they are retried, splitting claims by owner, slot sharing,
heartbeat timing, lease loss and shutdown. No node: calls go to a scripted
``_rpc`` or to a fake scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from clients import (
    ClaimedJob,
    ConflictError,
    DuplicateJobError,
    EnqueueResult,
    FailResult,
    InvalidArgumentError,
    JobContext,
    JobNotFoundError,
    JobState,
    LeaseLostError,
    MeshError,
    NewJob,
    NotFoundError,
    PermanentJobError,
    QueueFullError,
    RetryJobLater,
    SchedulerClient,
    UnavailableError,
    Worker,
)
from clients.errors import from_rpc_error
from clients.job_runtime import (
    ERROR_LIMIT,
    Handler,
    LeaseClock,
    Slots,
    describe_error,
    loop_share,
)
from clients.job_types import JobBackoff, encode
from clients.mesh import Mesh
from clients.retry import Verdict, classify
from clients.router import Target
from clients.saga import SagaType, StepContext
from clients.scheduler import shares
from mesh.saga.v1 import saga_pb2 as saga_pb
from mesh.scheduler.v1 import scheduler_pb2 as pb

ADDRESS = "10.0.0.1:7000"


def rpc_error(code: grpc.StatusCode, reason: str, metadata: dict[str, str] | None = None,
              address: str = ADDRESS) -> MeshError:
    """An error as the client sees it, parsed from a real rich status."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain="mesh", metadata=metadata or {})
    detail = status_pb2.Status().details.add()
    detail.Pack(info)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=reason,
                              details=[detail])
    status = rpc_status.to_status(proto)
    error = grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(),
                                 grpc.aio.Metadata(*status.trailing_metadata), status.details)
    return from_rpc_error(error, address)


def lease_lost(state: str = "JOB_STATE_PENDING") -> MeshError:
    return rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST", {"state": state})


# -- errors and values ---------------------------------------------------------------

def test_scheduler_reasons_map_to_their_errors() -> None:
    lost = lease_lost("JOB_STATE_CANCELLED")
    assert isinstance(lost, LeaseLostError) and lost.state == "CANCELLED"
    assert classify(lost) is Verdict.FINAL
    dup = rpc_error(grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_JOB", {"job_id": "j{7}1"})
    assert isinstance(dup, DuplicateJobError) and isinstance(dup, ConflictError)
    assert dup.job_id == "j{7}1"
    missing = rpc_error(grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    assert isinstance(missing, JobNotFoundError) and isinstance(missing, NotFoundError)
    assert isinstance(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL"),
                      QueueFullError)


def test_payloads_states_and_backoff() -> None:
    assert encode(None) == b"" and encode("é") == "é".encode()
    assert encode({"a": [1, 2]}) == b'{"a":[1,2]}' and encode(b"\x00") == b"\x00"
    assert JobState.parse("dead") is JobState.DEAD
    assert JobState.parse("JOB_STATE_LEASED") is JobState.LEASED
    assert JobState.parse(99) is JobState.UNSPECIFIED and JobState.DEAD.finished
    wire = JobBackoff(initial=0.5, multiplier=3.0).to_proto()
    assert wire.initial_delay.ToNanoseconds() == 500_000_000 and not wire.HasField("max_delay")
    assert JobBackoff.from_proto(wire) == JobBackoff(0.5, 0.0, 3.0, 0.0)


def test_error_description_keeps_the_end_of_the_traceback() -> None:
    try:
        raise ValueError("x" * 10_000)
    except ValueError as exc:
        text = describe_error(exc)
    assert text.startswith("ValueError: xxx") and len(text) <= ERROR_LIMIT
    try:
        raise KeyError("k")
    except KeyError as exc:
        text = describe_error(exc)
    assert text.startswith("KeyError: 'k'") and "Traceback" in text


# -- the client's calls, against a scripted node --------------------------------------

class FakeMesh:
    """What SchedulerClient uses of a Mesh: nodes per queue from ``owners``."""

    max_message_bytes = 32 << 20

    def __init__(self, owners: dict[str, str] | None = None) -> None:
        self.timeout = 1.0
        self.epoch = 0
        self.owners = owners or {}

    async def refresh(self, timeout: float | None = None) -> None:
        pass

    def route(self, service: str, key: str | bytes) -> Target:
        assert service == "scheduler"
        address = self.owners.get(str(key))
        return Target(address, address, 1, 1) if address else Target(ADDRESS, "n1")


class ScriptedScheduler(SchedulerClient):
    """Calls answered by ``script[method]``: a callable (request, address) or a list."""

    def __init__(self, owners: dict[str, str] | None = None, **script: Any) -> None:
        super().__init__(cast(Mesh, FakeMesh(owners)))
        self.script = script
        self.sent: list[tuple[str, str, Any]] = []

    async def _rpc(self, address: str, method: str, request: Any, budget: float) -> Any:
        self.sent.append((method, address, request))
        answer = self.script[method]
        outcome = await answer(request, address) if callable(answer) else answer.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def test_enqueue_sends_every_option() -> None:
    client = ScriptedScheduler(Enqueue=[pb.EnqueueResponse(
        job_id="j1", duplicate=True, state=pb.JOB_STATE_SCHEDULED)])
    result = await client.enqueue_result(
        "mail", "email.send", {"to": "a"}, priority=7, delay=2.5, max_attempts=4,
        backoff=JobBackoff(initial=1, maximum=10, multiplier=2, jitter=0.1), job_timeout=60,
        unique_key="u1", unique_ttl=30, strict_unique=True, retention=5)
    assert result.job_id == "j1" and result.duplicate and result.state is JobState.SCHEDULED
    (_, _, r), = client.sent
    assert (r.queue, r.type, r.payload, r.priority) == ("mail", "email.send", b'{"to":"a"}', 7)
    assert r.WhichOneof("when") == "delay" and r.delay.ToNanoseconds() == 2_500_000_000
    assert r.max_attempts == 4 and r.backoff.jitter == pytest.approx(0.1)
    assert r.timeout.seconds == 60 and r.unique_ttl.seconds == 30 and r.retention.seconds == 5
    assert r.unique_key == "u1" and r.strict_unique
    with pytest.raises(InvalidArgumentError):
        await client.enqueue("mail", "t", run_at=1.0, delay=1.0)


async def test_enqueue_is_repeated_after_an_unknown_outcome_with_the_same_request_id() -> None:
    unknown = rpc_error(grpc.StatusCode.UNAVAILABLE, "NOT_COMMITTED")
    client = ScriptedScheduler(Enqueue=[unknown, pb.EnqueueResponse(job_id="j1", replayed=True),
                                        pb.EnqueueResponse(job_id="j9")])
    result = await client.enqueue_result("q", "t")
    assert result.job_id == "j1" and result.replayed
    first, again = (r for _, _, r in client.sent)
    assert len(first.request_id) == 36 and again.request_id == first.request_id  # a UUID
    await client.enqueue("q", "t")  # each call has its own
    assert client.sent[-1][2].request_id not in ("", first.request_id)
    # The caller's own id, strict unique keys too.
    client = ScriptedScheduler(Enqueue=[unknown, pb.EnqueueResponse(job_id="j2")])
    assert await client.enqueue("q", "t", unique_key="k", strict_unique=True,
                                request_id="saga-7:step-2") == "j2"
    assert [r.request_id for _, _, r in client.sent] == ["saga-7:step-2"] * 2
    # Certainly not executed: retried too.
    refused = rpc_error(grpc.StatusCode.UNAVAILABLE, "GROUP_UNAVAILABLE")
    client = ScriptedScheduler(Enqueue=[refused, pb.EnqueueResponse(job_id="j3")])
    assert await client.enqueue("q", "t") == "j3"


async def test_complete_and_fail_are_repeated_and_lease_loss_is_final() -> None:
    unknown = rpc_error(grpc.StatusCode.UNAVAILABLE, "NOT_COMMITTED")
    client = ScriptedScheduler(Complete=[unknown, pb.CompleteResponse()],
                               Fail=[unknown, pb.FailResponse(state=pb.JOB_STATE_DEAD,
                                                              attempts=3)],
                               Heartbeat=[lease_lost()])
    await client.complete("j1", 5, {"ok": True})
    assert [m for m, *_ in client.sent] == ["Complete", "Complete"]
    failed = await client.fail("j1", 5, ValueError("bad"), retryable=False, retry_delay=0)
    assert failed == FailResult(JobState.DEAD, None, 3)
    request = client.sent[-1][2]
    assert request.error == "ValueError: bad" and not request.retryable
    assert request.HasField("retry_delay")
    with pytest.raises(LeaseLostError):
        await client.heartbeat("j1", 5)


async def test_claim_is_not_repeated_after_an_unknown_outcome() -> None:
    unknown = rpc_error(grpc.StatusCode.UNAVAILABLE, "")
    client = ScriptedScheduler(Claim=[unknown, pb.ClaimResponse()])
    with pytest.raises(UnavailableError):
        await client.claim("q", worker_id="w", wait=0.1)
    assert len(client.sent) == 1


def claimed(job_id: str, queue: str = "q", type: str = "t", priority: int = 0,
            attempt: int = 1, max_attempts: int = 3) -> pb.ClaimedJob:
    return pb.ClaimedJob(job_id=job_id, queue=queue, type=type, lease_token=7,
                         priority=priority, attempt=attempt, max_attempts=max_attempts)


async def test_claim_splits_queues_by_owner_and_stops_waiting_at_the_first_jobs() -> None:
    owners = {"a1": "n1:1", "a2": "n1:1", "b": "n2:1", "c": "n3:1"}
    cancelled: list[str] = []

    async def claim(request: pb.ClaimRequest, address: str) -> pb.ClaimResponse:
        if address == "n2:1":
            await asyncio.sleep(0.05)
            return pb.ClaimResponse(jobs=[claimed("jb", "b", priority=1)])
        try:
            await asyncio.sleep(10)  # long-polls an empty queue
        except asyncio.CancelledError:
            cancelled.append(address)
            raise
        return pb.ClaimResponse()

    client = ScriptedScheduler(owners, Claim=claim)
    assert client.owners(["a1", "b", "a2", "c", "b"]) == [["a1", "a2"], ["b"], ["c"]]
    started = time.monotonic()
    jobs = await client.claim(["a1", "b", "a2", "c"], worker_id="w", max_jobs=5, wait=10)
    assert time.monotonic() - started < 2
    assert [j.job_id for j in jobs] == ["jb"] and jobs[0].lease_token == 7
    assert sorted(cancelled) == ["n1:1", "n3:1"]
    asked = {address: request for _, address, request in client.sent}
    assert list(asked["n1:1"].queues) == ["a1", "a2"]
    assert sum(r.max_jobs for r in asked.values()) == 5  # shared out: never more than asked
    assert asked["n2:1"].wait.seconds == 10


def test_shares_split_evenly_and_rotate() -> None:
    assert shares(5, 2) == [3, 2] and shares(6, 3) == [2, 2, 2]
    assert shares(1, 3, turn=0) == [1, 0, 0] and shares(1, 3, turn=2) == [0, 0, 1]
    assert sum(shares(100, 7, turn=3)) == 100


# -- pure pieces of the pool -------------------------------------------------------------

def test_loop_share_never_lets_idle_polls_hold_every_slot() -> None:
    for concurrency, loops in itertools.product(range(1, 20), range(1, 8)):
        share = loop_share(concurrency, loops)
        assert share >= 1
        if concurrency >= loops:
            assert (loops - 1) * share < concurrency


def test_lease_clock_beats_every_third_and_presumes_loss_at_the_margin() -> None:
    clock = LeaseClock.for_job(lease=3.0, sent=100.0)
    assert clock.next_beat() == pytest.approx(101.0)
    assert clock.deadline == pytest.approx(102.7)  # margin: a tenth
    assert clock.retry_at(101.0) == pytest.approx(101.333, abs=1e-3)
    assert clock.retry_at(102.6) == pytest.approx(102.7)  # never past the deadline
    clock.renew(101.2)
    clock.renew(100.5)  # an older send never moves it back
    assert clock.renewed == 101.2 and clock.next_beat() == pytest.approx(102.2)
    assert LeaseClock.for_job(30.0, 0.0, interval=2.0).next_beat() == 2.0


async def test_slots_are_reserved_up_to_what_is_free_and_waiters_wake() -> None:
    slots = Slots(3)
    assert await slots.reserve(2) == 2 and await slots.reserve(5) == 1 and slots.busy == 3
    waiter = asyncio.ensure_future(slots.reserve(2))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    slots.release(2)
    assert await asyncio.wait_for(waiter, 1) == 2
    stopped = False
    blocked = asyncio.ensure_future(slots.reserve(1, lambda: stopped))
    await asyncio.sleep(0.01)
    stopped = True
    slots.wake()
    assert await asyncio.wait_for(blocked, 1) == 0


# -- the pool against a fake scheduler ------------------------------------------------------

class FakeScheduler:
    """Ready jobs per queue, long polls, and a record of every call."""

    def __init__(self, plan: list[list[str]] | None = None) -> None:
        self.plan = plan
        self.ready: deque[ClaimedJob] = deque()
        self.arrived = asyncio.Event()
        self.claims: list[tuple[list[str], int]] = []
        self.cancelled_claims = 0
        self.heartbeats: list[tuple[str, float]] = []
        self.completed: dict[str, Any] = {}
        self.failed: list[tuple[str, str, bool, float | None]] = []
        self.heartbeat_error: dict[str, MeshError] = {}
        self.complete_error: dict[str, MeshError] = {}
        self.claim_error: MeshError | None = None
        self.beating: set[str] = set()
        self.heartbeat_latency = 0.0
        self.batches: list[list[str]] = []
        self.chained = 0
        self._ids = itertools.count(1)

    def add(self, type: str = "t", queue: str = "q", lease: float = 30.0,
            attempt: int = 1, max_attempts: int = 3, payload: bytes = b"") -> str:
        job_id = f"j{next(self._ids)}"
        self.ready.append(ClaimedJob(job_id, queue, type, payload, 1, attempt, max_attempts,
                                     0, 0, None, None, None, lease))
        self.arrived.set()
        return job_id

    def owners(self, queues: Sequence[str]) -> list[list[str]]:
        return self.plan or [list(queues)]

    async def claim_at(self, queues: Sequence[str], *, worker_id: str, max_jobs: int = 1,
                       lease: float = 30.0, wait: float = 0.0,
                       timeout: float | None = None) -> list[ClaimedJob]:
        self.claims.append((list(queues), max_jobs))
        if self.claim_error is not None:
            raise self.claim_error
        give_up = time.monotonic() + wait
        try:
            while True:
                mine = [j for j in self.ready if j.queue in queues][:max_jobs]
                if mine or time.monotonic() >= give_up:
                    for job in mine:
                        self.ready.remove(job)
                    return mine
                self.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), give_up - time.monotonic())
        except asyncio.CancelledError:
            self.cancelled_claims += 1
            raise

    async def heartbeat(self, job_id: str, lease_token: int, *, extend: float | None = None,
                        timeout: float | None = None) -> float | None:
        self.heartbeats.append((job_id, time.monotonic()))
        if job_id in self.heartbeat_error:
            raise self.heartbeat_error[job_id]
        self.beating.add(job_id)
        try:
            await asyncio.sleep(self.heartbeat_latency)
        finally:
            self.beating.discard(job_id)
        return None

    async def complete(self, job_id: str, lease_token: int, result: Any = None, *,
                       timeout: float | None = None) -> float | None:
        # A heartbeat still on its way would be refused once this applies.
        assert job_id not in self.beating, "Complete raced a heartbeat"
        if job_id in self.complete_error:
            raise self.complete_error[job_id]
        self.completed[job_id] = result
        return None

    async def fail(self, job_id: str, lease_token: int, error: str | BaseException, *,
                   retryable: bool = True, retry_delay: float | None = None,
                   timeout: float | None = None) -> FailResult:
        self.failed.append((job_id, str(error), retryable, retry_delay))
        return FailResult(JobState.SCHEDULED, None, 1)

    async def heartbeat_many(self, leases: Sequence[tuple[str, int]], *,
                             extend: float | None = None, timeout: float | None = None
                             ) -> list[float | MeshError | None]:
        self.batches.append([job_id for job_id, _ in leases])

        async def one(job_id: str, token: int) -> float | MeshError | None:
            try:
                return await self.heartbeat(job_id, token, extend=extend, timeout=timeout)
            except MeshError as exc:
                return exc
        return list(await asyncio.gather(*(one(j, t) for j, t in leases)))

    def _next(self, queues: Sequence[str], max_jobs: int) -> list[ClaimedJob]:
        mine = [j for j in self.ready if j.queue in queues][:max_jobs]
        for job in mine:
            self.ready.remove(job)
        self.chained += len(mine)
        return mine

    async def complete_and_claim(
        self, job_id: str, lease_token: int, result: Any = None, *, queues: Sequence[str],
        worker_id: str, max_jobs: int = 1, lease: float = 30.0, timeout: float | None = None,
    ) -> tuple[float | None, list[ClaimedJob]]:
        await self.complete(job_id, lease_token, result, timeout=timeout)
        return None, self._next(queues, max_jobs)

    async def fail_and_claim(
        self, job_id: str, lease_token: int, error: str | BaseException, *,
        queues: Sequence[str], worker_id: str, max_jobs: int = 1, lease: float = 30.0,
        retryable: bool = True, retry_delay: float | None = None,
        timeout: float | None = None,
    ) -> tuple[FailResult, list[ClaimedJob]]:
        failed = await self.fail(job_id, lease_token, error, retryable=retryable,
                                 retry_delay=retry_delay, timeout=timeout)
        return failed, self._next(queues, max_jobs)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_pool_runs_several_types_within_its_concurrency_and_claims_in_batches() -> None:
    fake = FakeScheduler()
    running = peak = 0
    threads: set[str] = set()

    async def slow(job: JobContext) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return job.payload.upper()

    def plain(job: JobContext) -> dict[str, int]:
        threads.add(threading.current_thread().name)
        return {"n": len(job.payload)}

    for i in range(12):
        fake.add("slow", payload=f"p{i}".encode())
    fake.add("plain", payload=b"abc")
    async with Worker(fake, "q", {"slow": slow, "plain": plain}, concurrency=4, poll=0.2):
        await until(lambda: len(fake.completed) == 13)
    assert peak == 4
    assert all(n <= 4 for _, n in fake.claims)  # never more than the free slots
    assert fake.completed["j1"] == b"P0" and fake.completed["j13"] == {"n": 3}
    assert threads and threading.current_thread().name not in threads


async def test_plain_saga_step_handlers_run_in_threads_of_their_own() -> None:
    # More at once than the loop's default executor has threads: each must get
    # a thread of its own, as a plain job handler does, or they never all meet.
    count = min(32, (os.cpu_count() or 1) + 4) + 2
    barrier = threading.Barrier(count, timeout=5)
    order = SagaType("o", queue="q")

    @order.step("wait")
    def wait(step: StepContext) -> str:
        barrier.wait()
        return step.idempotency_key

    fake = FakeScheduler()
    for i in range(count):
        fake.add("o.wait", payload=saga_pb.StepTask(
            saga_id=f"s{i}", step="wait", idempotency_key=f"s{i}/wait/action")
            .SerializeToString())
    async with Worker(fake, "q", order.handlers(), concurrency=count, poll=0.1):
        await until(lambda: len(fake.completed) + len(fake.failed) == count, timeout=10)
    assert not fake.failed
    keys = sorted(f"s{i}/wait/action".encode() for i in range(count))
    assert sorted(fake.completed.values()) == keys


async def test_handler_errors_fail_the_attempt_as_they_ask() -> None:
    fake = FakeScheduler()

    async def broken(job: JobContext) -> None:
        raise ValueError("no good")

    async def hopeless(job: JobContext) -> None:
        raise PermanentJobError("never works")

    def later(job: JobContext) -> None:
        raise RetryJobLater(7.5, "rate limited")

    fake.add("broken")
    fake.add("hopeless")
    fake.add("later")
    fake.add("unknown")
    handlers: dict[str, Handler] = {"broken": broken, "hopeless": hopeless, "later": later}
    async with Worker(fake, "q", handlers, concurrency=4, poll=0.1) as worker:
        await until(lambda: len(fake.failed) == 4)
    failed = {job_id: (error, retryable, delay) for job_id, error, retryable, delay in fake.failed}
    assert failed["j1"][0].startswith("ValueError: no good") and failed["j1"][1:] == (True, None)
    assert failed["j2"][1:] == (False, None)
    assert failed["j3"] == ("rate limited", True, 7.5)
    assert "no handler for job type 'unknown'" in failed["j4"][0] and failed["j4"][1]
    assert worker.stats.failed == 4 and not fake.completed


async def test_heartbeats_keep_a_long_job_and_stop_with_it() -> None:
    fake = FakeScheduler()
    fake.heartbeat_latency = 0.06  # often in flight when the handler returns
    fake.add("long", lease=0.3)

    async def long(job: JobContext) -> str:
        await asyncio.sleep(0.65)
        return "done"

    async with Worker(fake, "q", {"long": long}, poll=0.1):
        await until(lambda: "j1" in fake.completed)
        beats = [t for _, t in fake.heartbeats]
        await asyncio.sleep(0.25)
    assert 4 <= len(beats) <= 8  # every lease/3 = 0.1 s
    assert len(fake.heartbeats) == len(beats)  # none after the job ended


async def test_lease_lost_on_heartbeat_cancels_the_handler_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeScheduler()
    job_id = fake.add("long", lease=0.3)
    fake.heartbeat_error[job_id] = lease_lost("JOB_STATE_CANCELLED")
    cancelled = asyncio.Event()

    async def long(job: JobContext) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            assert job.lost
            with pytest.raises(LeaseLostError):
                job.check()
            cancelled.set()
            raise

    with caplog.at_level(logging.WARNING, logger="clients.worker"):
        async with Worker(fake, "q", {"long": long}, poll=0.1) as worker:
            await asyncio.wait_for(cancelled.wait(), 2)
            await until(lambda: worker.running == 0)
    assert not fake.completed and not fake.failed and worker.stats.lost == 1
    assert "lost its lease" in caplog.text and "CANCELLED" in caplog.text


async def test_lease_presumed_lost_when_no_heartbeat_gets_through() -> None:
    fake = FakeScheduler()
    job_id = fake.add("long", lease=0.4)
    fake.heartbeat_error[job_id] = rpc_error(grpc.StatusCode.UNAVAILABLE, "")
    started = time.monotonic()
    seen_lost = threading.Event()

    def stuck(job: JobContext) -> str:  # a thread: cannot be cancelled, only told
        while not job.lost:
            time.sleep(0.01)
        seen_lost.set()
        return "too late"

    async with Worker(fake, "q", {"long": stuck}, poll=0.1) as worker:
        await until(seen_lost.is_set)
        await until(lambda: worker.running == 0)
    assert 0.3 < time.monotonic() - started < 1.5
    assert len(fake.heartbeats) >= 2 and not fake.completed and worker.stats.lost == 1


async def test_lease_lost_on_complete_is_only_logged() -> None:
    fake = FakeScheduler()
    job_id = fake.add("quick")
    fake.complete_error[job_id] = lease_lost()

    async def quick(job: JobContext) -> str:
        return "r"

    async with Worker(fake, "q", {"quick": quick}, poll=0.1) as worker:
        await until(lambda: worker.stats.lost == 1)
    assert worker.stats.succeeded == 0 and not fake.failed


async def test_graceful_stop_stops_claiming_and_lets_running_jobs_finish() -> None:
    fake = FakeScheduler()
    fake.add("work")
    finished = asyncio.Event()

    async def work(job: JobContext) -> str:
        await asyncio.sleep(0.3)
        assert job.stopping
        finished.set()
        return "ok"

    worker = await Worker(fake, "q", {"work": work}, concurrency=2, poll=5.0).start()
    await until(lambda: worker.running == 1 and fake.cancelled_claims == 0
                and len(fake.claims) >= 2)  # the second claim long-polls
    await worker.stop(grace=5)
    assert finished.is_set() and fake.completed == {"j1": "ok"}
    assert fake.cancelled_claims == 1  # the long poll was cancelled, not waited out
    claims = len(fake.claims)
    fake.add("work")
    await asyncio.sleep(0.2)
    assert len(fake.claims) == claims and fake.ready  # nothing claimed any more


async def test_jobs_still_running_after_the_grace_period_are_handed_back() -> None:
    fake = FakeScheduler()
    fake.add("stuck")
    fake.add("stuck", attempt=3, max_attempts=3)  # its last chance: not failed

    async def stuck(job: JobContext) -> None:
        await asyncio.sleep(30)

    worker = await Worker(fake, "q", {"stuck": stuck}, concurrency=2, poll=0.1).start()
    await until(lambda: worker.running == 2)
    started = time.monotonic()
    await worker.stop(grace=0.2)
    assert 0.15 < time.monotonic() - started < 2
    assert fake.failed == [("j1", fake.failed[0][1], True, 0.0)]
    assert "shut down" in fake.failed[0][1] and worker.stats.returned == 1
    assert not fake.completed and worker.running == 0


async def test_sigterm_under_run_is_a_graceful_stop_and_a_second_one_hurries() -> None:
    fake = FakeScheduler()
    fake.add("work")
    fake.add("stuck")
    done = asyncio.Event()

    async def work(job: JobContext) -> str:
        await asyncio.sleep(0.2)
        done.set()
        return "ok"

    async def stuck(job: JobContext) -> None:
        await asyncio.sleep(30)

    worker = Worker(fake, "q", {"work": work, "stuck": stuck}, concurrency=2, poll=0.1,
                    grace=30)
    runner = asyncio.ensure_future(worker.run())
    await until(lambda: worker.running == 2)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(done.wait(), 2)
    await until(lambda: worker.running == 1)
    assert not runner.done()  # still within its grace period for "stuck"
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(runner, 2)
    assert fake.completed == {"j1": "ok"} and [f[0] for f in fake.failed] == ["j2"]


async def test_a_fatal_claim_error_stops_the_worker_and_run_raises_it() -> None:
    fake = FakeScheduler()
    fake.claim_error = InvalidArgumentError("queues: bad name")
    worker = Worker(fake, "bad queue", {}, poll=0.1)
    with pytest.raises(InvalidArgumentError):
        await asyncio.wait_for(worker.run(), 5)


async def test_transient_claim_errors_are_retried() -> None:
    fake = FakeScheduler()
    fake.claim_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "")
    fake.add("t")

    async def handler(job: JobContext) -> None:
        return None

    async with Worker(fake, "q", {"t": handler}, poll=0.1):
        await until(lambda: len(fake.claims) >= 2)
        fake.claim_error = None
        await until(lambda: "j1" in fake.completed)


async def test_one_claim_loop_per_owner_replanned_when_the_map_moves() -> None:
    fake = FakeScheduler(plan=[["a", "b"], ["c"]])

    async def handler(job: JobContext) -> None:
        return None

    async with Worker(fake, ["a", "b", "c"], {"t": handler}, concurrency=4, poll=0.1):
        await until(lambda: {tuple(q) for q, _ in fake.claims} == {("a", "b"), ("c",)})
        assert all(n <= 2 for _, n in fake.claims)  # each loop its share of the slots
        fake.plan = [["a"], ["b", "c"]]
        count = len(fake.claims)
        await until(lambda: ("b", "c") in {tuple(q) for q, _ in fake.claims[count:]}, 4)
        fake.add("t", queue="c")
        await until(lambda: "j1" in fake.completed)


# -- batches: enqueue_many, heartbeats together, Complete that leases the next job -----

async def test_enqueue_many_splits_by_owner_and_resends_what_a_node_could_not_take() -> None:
    owners = {"a": "n1:1", "b": "n2:1"}
    tries: dict[str, int] = {}

    async def batch(request: pb.EnqueueBatchRequest, address: str) -> pb.EnqueueBatchResponse:
        reply = pb.EnqueueBatchResponse()
        for job in request.jobs:
            tries[job.request_id] = tries.get(job.request_id, 0) + 1
            if job.priority == 99:
                reply.results.add(error=pb.ItemError(
                    code=3, reason="INVALID_ARGUMENT", message="bad",
                    field_violations={"jobs[0].priority": "must be 0 to 9"}))
            elif job.payload == b"busy" and tries[job.request_id] == 1:
                reply.results.add(error=pb.ItemError(code=14, reason="NOT_COMMITTED",
                                                     message="try again"))
            else:
                reply.results.add(job=pb.EnqueueResponse(
                    job_id=f"{address}/{job.request_id}", state=pb.JOB_STATE_PENDING))
        return reply

    client = ScriptedScheduler(owners, EnqueueBatch=batch)
    jobs = [NewJob("a", "t"), NewJob("b", "t", request_id="mine"),
            NewJob("a", "t", priority=99), NewJob("b", "t", b"busy")]
    results = await client.enqueue_many(jobs, timeout=5)
    sent = [(address, [j.queue for j in r.jobs]) for _, address, r in client.sent]
    assert sent[:2] == [("n1:1", ["a", "a"]), ("n2:1", ["b", "b"])]
    assert sent[2:] == [("n2:1", ["b"])]  # only the job the node could not take, again
    first, second, bad, busy = results
    assert isinstance(first, EnqueueResult) and first.job_id.startswith("n1:1/")
    assert isinstance(second, EnqueueResult) and second.job_id == "n2:1/mine"
    assert isinstance(bad, InvalidArgumentError)
    assert bad.field_violations == {"jobs[2].priority": "must be 0 to 9"}  # the caller's index
    assert isinstance(busy, EnqueueResult)
    busy_id = client.sent[2][2].jobs[0].request_id
    assert tries[busy_id] == 2 and busy.job_id == f"n2:1/{busy_id}"  # one request id


async def test_heartbeats_due_together_go_in_one_batch_and_a_loss_is_one_jobs() -> None:
    fake = FakeScheduler()
    ids = [fake.add("long", lease=0.6) for _ in range(4)]
    fake.heartbeat_error[ids[1]] = lease_lost("JOB_STATE_CANCELLED")
    lost = asyncio.Event()

    async def long(job: JobContext) -> str:
        try:
            await asyncio.sleep(0.9)
        except asyncio.CancelledError:
            lost.set()
            raise
        return "ok"

    async with Worker(fake, "q", {"long": long}, concurrency=4, poll=0.1) as worker:
        await until(lambda: len(fake.completed) == 3)
        assert lost.is_set() and worker.stats.lost == 1
    assert set(fake.completed) == {ids[0], ids[2], ids[3]}
    assert max(len(b) for b in fake.batches) == 4  # all four beat in one call
    assert len(fake.heartbeats) > len(fake.batches)


async def test_a_finished_job_leases_the_next_one_in_its_report() -> None:
    fake = FakeScheduler()
    for i in range(20):
        fake.add("quick", payload=str(i).encode())

    async def quick(job: JobContext) -> bytes:
        await asyncio.sleep(0.01)
        return job.payload

    async with Worker(fake, "q", {"quick": quick, "bad": quick}, concurrency=2,
                      poll=0.2) as worker:
        await until(lambda: len(fake.completed) == 20)
        assert worker.stats.claimed == 20
    assert worker._slots.free == 2  # each slot went back once, passed on or not
    assert fake.chained > 10  # most jobs came with a Complete, not a Claim
    assert sum(n for _, n in fake.claims) < 20 or len(fake.claims) < 20
    async with Worker(fake, "q", {"quick": quick}, concurrency=2, poll=0.2,
                      chain=False) as worker:
        chained = fake.chained
        for i in range(5):
            fake.add("quick", payload=str(i).encode())
        await until(lambda: len(fake.completed) == 25)
    assert fake.chained == chained
