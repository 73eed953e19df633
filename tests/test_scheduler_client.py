"""The job scheduler through the typed client and its worker pool, against real node
processes: jobs of several types on queues of every node, priorities, retries
into the dead letters and back (client and meshctl), heartbeats outlasting a
lease, a cancelled running job, SIGTERM on a worker process, unique keys, cron
schedules, a worker without the map, a worker across a failover, and the
blocking facade."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from clients import (
    AttemptOutcome,
    DuplicateJobError,
    EnqueueResult,
    InvalidArgumentError,
    JobBackoff,
    JobContext,
    JobNotFoundError,
    JobState,
    JobTemplate,
    LeaseLostError,
    Mesh,
    NewJob,
    PermanentJobError,
    Worker,
)
from clients.sync import SyncMesh
from common.localmesh import LocalMesh
from common.slots import slot_for
from tests.cluster import workers

Connect = Callable[..., Awaitable[Mesh]]
FAST = JobBackoff(initial=0.1, maximum=0.1, multiplier=1.0)
"""Retries 0.1 s apart, exactly."""


@pytest.fixture
async def mesh(shared_cluster: LocalMesh, mesh_client: Connect) -> Mesh:
    return await mesh_client(cluster=shared_cluster.cluster)


def _queues_on_every_node(mesh: Mesh, prefix: str) -> list[str]:
    """One queue name led by each primary."""
    table = mesh.table
    assert table is not None
    queues: dict[str, str] = {}
    for i in range(10_000):
        group = table.group_of_slot(slot_for(f"{prefix}{i}"))
        if group is not None and group.primary not in queues:
            queues[group.primary] = f"{prefix}{i}"
    assert len(queues) == 3
    return sorted(queues.values())


async def _until(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _state(mesh: Mesh, job_id: str) -> JobState:
    return (await mesh.scheduler.get_job(job_id)).state


async def _meshctl(local: LocalMesh, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl", "--etcd", local.etcd_endpoint, "--cluster",
        local.cluster, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_worker_runs_jobs_of_several_types_from_every_node(mesh: Mesh) -> None:
    queues = _queues_on_every_node(mesh, "mixed-")
    assert len(mesh.scheduler.owners(queues)) == 3
    running = peak = 0
    threads: set[int] = set()

    async def resize(job: JobContext) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return {"size": job.json()["n"] * 2}

    def checksum(job: JobContext) -> bytes:
        threads.add(threading.get_ident())
        time.sleep(0.02)
        return job.payload[::-1]

    ids: dict[str, str] = {}
    for i in range(24):
        queue = queues[i % 3]
        if i % 2:
            ids[await mesh.scheduler.enqueue(queue, "resize", {"n": i})] = f'{{"size":{2 * i}}}'
        else:
            ids[await mesh.scheduler.enqueue(queue, "checksum", f"abc{i}")] = f"abc{i}"[::-1]
    async with Worker(mesh, queues, {"resize": resize, "checksum": checksum},
                      concurrency=4, poll=1.0) as worker:
        await _until(lambda: _done(worker, 24))
    assert 1 < peak <= 4 and threading.get_ident() not in threads
    for job_id, expected in ids.items():
        job = await mesh.scheduler.get_job(job_id)
        assert job.state is JobState.SUCCEEDED and job.result.decode() == expected
        assert [a.outcome for a in job.attempts] == [AttemptOutcome.SUCCEEDED]
        assert job.attempts[0].worker_id == worker.worker_id
    stats = await mesh.scheduler.stats(queues[0])
    assert stats.done == 8 and stats.succeeded_total == 8 and stats.ready == 0


async def _done(worker: Worker, count: int) -> bool:
    return worker.stats.succeeded >= count


async def test_priorities_are_honoured(mesh: Mesh) -> None:
    queue = "prio-client"
    order: list[str] = []
    for name, priority in [("low", 1), ("mid-a", 5), ("zero", 0), ("top", 9), ("mid-b", 5)]:
        await mesh.scheduler.enqueue(queue, "record", name, priority=priority)

    async def record(job: JobContext) -> None:
        order.append(job.payload.decode())

    async with Worker(mesh, queue, {"record": record}, concurrency=1, poll=1.0) as worker:
        await _until(lambda: _done(worker, 5))
    assert order == ["top", "mid-a", "mid-b", "low", "zero"]


async def test_failures_are_retried_then_dead_lettered_and_requeued(
    mesh: Mesh, shared_cluster: LocalMesh
) -> None:
    queue = "dead-client"
    healthy = False

    async def flaky(job: JobContext) -> str:
        if not healthy:
            raise RuntimeError(f"backend down (attempt {job.attempt})")
        return "recovered"

    async def broken(job: JobContext) -> None:
        raise PermanentJobError("payload can never work")

    flaky_id = await mesh.scheduler.enqueue(queue, "flaky", max_attempts=3, backoff=FAST)
    broken_id = await mesh.scheduler.enqueue(queue, "broken", max_attempts=5)
    async with Worker(mesh, queue, {"flaky": flaky, "broken": broken}, poll=0.5):
        await _until(lambda: _dead(mesh, queue, 2))
    job = await mesh.scheduler.get_job(flaky_id)
    assert job.state is JobState.DEAD and job.attempt_count == 3
    assert [a.outcome for a in job.attempts] == [AttemptOutcome.FAILED] * 3
    assert "backend down (attempt 3)" in job.last_error
    assert "RuntimeError" in job.attempts[0].error and "Traceback" in job.attempts[0].error
    assert (await mesh.scheduler.get_job(broken_id)).attempt_count == 1  # dead at once

    page = await mesh.scheduler.list_dead_letters(queue)
    assert page.total == 2 and {j.job_id for j in page.jobs} == {flaky_id, broken_id}
    stats_text = await _meshctl(shared_cluster, "jobs", "stats", queue)
    assert f"queue {queue!r}" in stats_text and "dead 2" in stats_text
    assert "failed attempts 4" in stats_text
    dead_text = await _meshctl(shared_cluster, "jobs", "dead", queue)
    assert "2 dead job(s)" in dead_text and flaky_id in dead_text
    assert "RuntimeError: backend down (attempt 3)" in dead_text
    assert "PermanentJobError: payload can never work" in dead_text

    # Requeued by the client: a fresh attempt budget, and this time it works.
    assert (await mesh.scheduler.requeue_dead_letters(queue, [flaky_id])).requeued == 1
    job = await mesh.scheduler.get_job(flaky_id)
    assert job.state is JobState.PENDING and job.attempt_count == 0
    healthy = True
    async with Worker(mesh, queue, {"flaky": flaky, "broken": broken}, poll=0.5) as worker:
        await _until(lambda: _done(worker, 1))
        # Requeued through meshctl: every dead job of the queue.
        out = await _meshctl(shared_cluster, "jobs", "requeue", queue)
        assert f"requeued 1 job(s) in {queue!r}; 0 still dead" in out
        await _until(lambda: _attempts(mesh, broken_id, 2))
    assert (await mesh.scheduler.get_job(flaky_id)).result == b"recovered"
    job = await mesh.scheduler.get_job(broken_id)
    assert job.state is JobState.DEAD and len(job.attempts) == 2  # the history is kept
    assert (await mesh.scheduler.purge_dead_letters(queue, all=True)).purged == 1
    assert (await mesh.scheduler.stats(queue)).dead == 0


async def _dead(mesh: Mesh, queue: str, count: int) -> bool:
    return (await mesh.scheduler.stats(queue)).dead >= count


async def _attempts(mesh: Mesh, job_id: str, count: int) -> bool:
    job = await mesh.scheduler.get_job(job_id)
    return job.state is JobState.DEAD and len(job.attempts) >= count


async def test_heartbeats_keep_a_job_longer_than_its_lease(mesh: Mesh) -> None:
    queue = "long-client"
    job_id = await mesh.scheduler.enqueue(queue, "long")

    async def long(job: JobContext) -> str:
        await asyncio.sleep(4.5)  # more than two leases
        return "finished"

    # 2 s leases: a heartbeat (every 0.67 s) slowed by a loaded machine does not
    # let the lease run out, as one slowed by half a second could with 1 s leases.
    async with Worker(mesh, queue, {"long": long}, lease=2.0, poll=0.5) as first, \
            Worker(mesh, queue, {"long": long}, lease=2.0, poll=0.5) as second:
        await _until(lambda: _finished(mesh, job_id))
    job = await mesh.scheduler.get_job(job_id)
    assert job.state is JobState.SUCCEEDED and job.result == b"finished"
    assert job.lease_losses == 0 and len(job.attempts) == 1
    assert first.stats.claimed + second.stats.claimed == 1  # never handed out again
    assert first.stats.lost == second.stats.lost == 0


async def _finished(mesh: Mesh, job_id: str) -> bool:
    return (await _state(mesh, job_id)).finished


async def test_a_cancelled_running_job_stops_its_handler(mesh: Mesh) -> None:
    queue = "cancel-client"
    job_id = await mesh.scheduler.enqueue(queue, "long")
    started, stopped = asyncio.Event(), asyncio.Event()

    async def long(job: JobContext) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.set()
            raise

    async with Worker(mesh, queue, {"long": long}, lease=1.0, poll=0.5) as worker:
        await asyncio.wait_for(started.wait(), 10)
        result = await mesh.scheduler.cancel(job_id)
        assert result.cancelled and result.state is JobState.CANCELLED
        await asyncio.wait_for(stopped.wait(), 5)  # the next heartbeat: LEASE_LOST
        await _until(lambda: _idle(worker), timeout=5)
        assert worker.stats.lost == 1
    job = await mesh.scheduler.get_job(job_id)
    assert job.state is JobState.CANCELLED
    assert job.attempts[-1].outcome is AttemptOutcome.CANCELLED


async def _idle(worker: Worker) -> bool:
    return worker.running == 0


async def test_sigterm_on_a_worker_process(
    mesh: Mesh, shared_cluster: LocalMesh, tmp_path: Path
) -> None:
    queue = "sigterm-client"
    async with workers(shared_cluster, tmp_path, "tests.scheduler_worker") as start:
        # Grace 10 s: the running job finishes, nothing more is claimed.
        worker = await start(queue, "10")
        await worker.line("RUNNING")
        short = await mesh.scheduler.enqueue(queue, "sleep", {"seconds": 1.5})
        await worker.line(f"STARTED {short}")
        worker.signal(signal.SIGTERM)
        # Handled (the worker logs it; a loaded machine may be slow to run it), then
        # a moment for its claims to be withdrawn; the job runs another second.
        deadline = time.monotonic() + 10
        while "SIGTERM, stopping" not in worker.errors.read_text():
            assert time.monotonic() < deadline, worker.errors.read_text()[-3000:]
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        later = await mesh.scheduler.enqueue(queue, "sleep", {"seconds": 0})
        await worker.line(f"DONE {short}")
        assert "succeeded=1" in await worker.line("STOPPED")
        assert await worker.process.wait() == 0
        assert await _state(mesh, short) is JobState.SUCCEEDED
        assert await _state(mesh, later) is JobState.PENDING
        await mesh.scheduler.cancel(later)

        # Grace 0.5 s: a job still running then is handed back for another worker.
        worker = await start(queue, "0.5")
        stuck = await mesh.scheduler.enqueue(queue, "sleep", {"seconds": 30})
        await worker.line(f"STARTED {stuck}")
        worker.signal(signal.SIGTERM)
        assert "returned=1" in await worker.line("STOPPED")
        assert await worker.process.wait() == 0
    job = await mesh.scheduler.get_job(stuck)
    assert job.state is JobState.PENDING and job.attempts[-1].outcome is AttemptOutcome.FAILED
    assert "shut down" in job.last_error
    await mesh.scheduler.cancel(stuck)


async def test_unique_keys_and_unknown_jobs(mesh: Mesh) -> None:
    queue = "unique-client"
    first = await mesh.scheduler.enqueue_result(queue, "t", unique_key="order-1")
    again = await mesh.scheduler.enqueue_result(queue, "t", unique_key="order-1")
    assert again.duplicate and again.job_id == first.job_id and not first.duplicate
    with pytest.raises(DuplicateJobError) as info:
        await mesh.scheduler.enqueue(queue, "t", unique_key="order-1", strict_unique=True)
    assert info.value.job_id == first.job_id
    delayed = await mesh.scheduler.enqueue_result(queue, "t", delay=60)
    assert delayed.state is JobState.SCHEDULED
    assert (await mesh.scheduler.stats(queue)).delayed == 1
    mine = await mesh.scheduler.enqueue_result(queue, "t", request_id="client-r1")
    same = await mesh.scheduler.enqueue_result(queue, "t", {"x": 1}, request_id="client-r1")
    assert same.replayed and same.job_id == mine.job_id and not mine.replayed
    for job_id in (first.job_id, delayed.job_id, mine.job_id):
        assert (await mesh.scheduler.cancel(job_id)).cancelled
    with pytest.raises(JobNotFoundError):
        await mesh.scheduler.get_job("{unique-client}no-such-job")


async def test_cron_schedules(mesh: Mesh) -> None:
    queue = "cron-client"
    template = JobTemplate("tick", {"from": "cron"}, priority=3)
    schedule = await mesh.scheduler.create_schedule(queue, "every-second", "* * * * * *",
                                                    template)
    assert schedule.next_fire_time is not None and schedule.template.priority == 3
    await _until(lambda: _stat(mesh, queue, "ready", 1), timeout=5)
    [listed] = [s async for s in mesh.scheduler.schedules(queue)]
    assert listed.schedule_id == "every-second" and listed.fired_total >= 1
    assert await mesh.scheduler.delete_schedule(queue, "every-second")
    assert not await mesh.scheduler.delete_schedule(queue, "every-second")
    [claimed] = await mesh.scheduler.claim(queue, max_jobs=1)
    assert claimed.type == "tick" and claimed.json() == {"from": "cron"}
    await mesh.scheduler.complete(claimed.job_id, claimed.lease_token)


async def _stat(mesh: Mesh, queue: str, field: str, at_least: int) -> bool:
    return int(getattr(await mesh.scheduler.stats(queue), field)) >= at_least


def test_sync_facade(shared_cluster: LocalMesh) -> None:
    queue = "sync-client"
    with SyncMesh(etcd=shared_cluster.etcd_endpoint, cluster=shared_cluster.cluster) as sync:
        ids = [sync.scheduler.enqueue(queue, "double", {"n": n}) for n in range(3)]
        once = sync.scheduler.enqueue_result(f"{queue}-once", "t", request_id="sync-r1")
        assert sync.scheduler.enqueue(f"{queue}-once", "t", request_id="sync-r1") == once.job_id

        def double(job: JobContext) -> str:
            return json.dumps(job.json()["n"] * 2)

        with sync.scheduler.worker(queue, {"double": double}, poll=0.5) as worker:
            deadline = time.monotonic() + 15
            while worker.stats.succeeded < 3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert [sync.scheduler.get_job(i).result for i in ids] == [b"0", b"2", b"4"]
        assert sync.scheduler.stats(queue).succeeded_total == 3
        assert list(sync.scheduler.dead_letters(queue)) == []


async def test_worker_without_the_map(shared_cluster: LocalMesh, mesh: Mesh,
                                      mesh_client: Connect) -> None:
    """With fixed addresses every queue gets its own claim loop; the node forwards."""
    fixed = await mesh_client(addresses=[shared_cluster.nodes[0].address])
    queues = _queues_on_every_node(mesh, "fixed-")
    assert fixed.scheduler.owners(queues) == [[q] for q in queues]
    ids = [await fixed.scheduler.enqueue(q, "echo", q) for q in queues for _ in range(2)]

    async def echo(job: JobContext) -> bytes:
        return job.payload

    async with Worker(fixed, queues, {"echo": echo}, concurrency=3, poll=0.5) as worker:
        await _until(lambda: _done(worker, len(ids)))
    for job_id in ids:
        job = await fixed.scheduler.get_job(job_id)
        assert job.state is JobState.SUCCEEDED and job.result == job.queue.encode()


async def test_worker_goes_on_across_a_failover(local_mesh: Any, mesh_client: Connect) -> None:
    """A primary is killed while jobs run and more are enqueued: the claim loops
    follow the new map and every job ends SUCCEEDED (at least once)."""
    local = local_mesh(3, lease_ttl=2)
    mesh = await mesh_client(timeout=15)
    queues = _queues_on_every_node(mesh, "fo-")
    victim = local.nodes[0]
    ran: dict[str, int] = {}

    async def tick(job: JobContext) -> None:
        ran[job.id] = ran.get(job.id, 0) + 1
        await asyncio.sleep(0.05)

    async def enqueue(batch: int) -> list[str]:
        # A unique key makes each enqueue safe to retry while the map moves.
        return [await mesh.scheduler.enqueue(q, "tick", unique_key=f"{batch}-{i}")
                for i in range(5) for q in queues]

    ids = await enqueue(0)
    async with Worker(mesh, queues, {"tick": tick}, concurrency=4, lease=2.0,
                      poll=1.0) as worker:
        await _until(lambda: _done(worker, 5))
        victim.child.signal(signal.SIGKILL)
        ids += await enqueue(1)
        await _until(lambda: _all_succeeded(mesh, ids), timeout=45)
    assert set(ran) == set(ids)


async def _all_succeeded(mesh: Mesh, ids: list[str]) -> bool:
    states = await asyncio.gather(*(_state(mesh, job_id) for job_id in ids))
    return all(state is JobState.SUCCEEDED for state in states)


async def test_batch_calls_enqueue_many_heartbeat_many_and_complete_and_claim(
        mesh: Mesh) -> None:
    queues = _queues_on_every_node(mesh, "batch-client-")
    jobs = [NewJob(q, "t", {"n": i}) for i, q in enumerate(queues * 4)]
    jobs.insert(3, NewJob(queues[0], "t", priority=10))
    jobs.append(NewJob(queues[1], "t", request_id="batch-client-once"))
    jobs.append(NewJob(queues[1], "t", request_id="batch-client-once"))
    results = await mesh.scheduler.enqueue_many(jobs)
    bad = results.pop(3)
    assert isinstance(bad, InvalidArgumentError)
    assert list(bad.field_violations) == ["jobs[3].priority"]
    assert all(isinstance(r, EnqueueResult) for r in results)
    made = [r for r in results if isinstance(r, EnqueueResult)]
    assert made[-1].replayed and made[-1].job_id == made[-2].job_id
    assert len({r.job_id for r in made}) == len(made) - 1
    for q in queues:
        assert (await mesh.scheduler.stats(q)).ready >= 4

    # Heartbeats of jobs of every node in one call; a cancelled one is its own loss.
    claimed = [job for q in queues for job in await mesh.scheduler.claim(q, max_jobs=2)]
    assert len(claimed) == 6
    await mesh.scheduler.cancel(claimed[1].job_id)
    beats = await mesh.scheduler.heartbeat_many(
        [(j.job_id, j.lease_token) for j in claimed], extend=60)
    assert isinstance(beats[1], LeaseLostError) and beats[1].state == "CANCELLED"
    assert all(isinstance(b, float) for i, b in enumerate(beats) if i != 1)

    # A Complete that leases the next job of the same node's queue.
    first = claimed[0]
    _, nxt = await mesh.scheduler.complete_and_claim(
        first.job_id, first.lease_token, "ok", queues=[first.queue], worker_id="w-chain")
    assert len(nxt) == 1 and nxt[0].queue == first.queue
    assert await _state(mesh, nxt[0].job_id) is JobState.LEASED
    failed, more = await mesh.scheduler.fail_and_claim(
        nxt[0].job_id, nxt[0].lease_token, "no", retryable=False, queues=[first.queue],
        worker_id="w-chain", max_jobs=5)
    assert failed.state is JobState.DEAD and len(more) >= 1


async def test_concurrent_enqueues_and_completes_coalesce_with_their_own_answers(
        mesh: Mesh) -> None:
    assert mesh.scheduler.coalesce
    queues = _queues_on_every_node(mesh, "coalesce-client-")
    # Enqueues made at once: one EnqueueBatch per node; each caller its own answer.
    answers = await asyncio.gather(
        *(mesh.scheduler.enqueue_result(q, "t", {"q": q}) for q in queues * 3),
        mesh.scheduler.enqueue_result(queues[0], "t", priority=10),
        return_exceptions=True)
    *made, bad = answers
    assert isinstance(bad, InvalidArgumentError)
    assert list(bad.field_violations) == ["priority"]  # named as in its own Enqueue
    assert all(isinstance(r, EnqueueResult) for r in made)
    assert len({r.job_id for r in made if isinstance(r, EnqueueResult)}) == len(made)

    # Completes made at once, one of a lease already lost: only that one fails.
    claimed = [job for q in queues for job in await mesh.scheduler.claim(q, max_jobs=3)]
    assert len(claimed) == len(made)
    lost = claimed[2]
    await mesh.scheduler.cancel(lost.job_id)
    done = await asyncio.gather(
        *(mesh.scheduler.complete(j.job_id, j.lease_token, f"r{i}")
          for i, j in enumerate(claimed)), return_exceptions=True)
    assert isinstance(done[2], LeaseLostError) and done[2].state == "CANCELLED"
    for i, (job, answer) in enumerate(zip(claimed, done, strict=True)):
        if job is lost:
            continue
        assert isinstance(answer, float), (i, answer)
        got = await mesh.scheduler.get_job(job.job_id)
        assert (got.state, got.result) == (JobState.SUCCEEDED, f"r{i}".encode())


async def test_jobs_whose_payloads_fill_more_than_a_message_are_enqueued_and_run(
        shared_cluster: LocalMesh, mesh_client: Connect) -> None:
    # 40 jobs of ~1 MB in one queue (one node): 40 MB, more than the 32 MiB a
    # message holds. The batch goes in parts; the node leases only what its
    # answer can carry (before, the answer was refused after its jobs were
    # leased, and they sat leased until the lease ran out). 40 MB written
    # durably on two nodes can take longer than the default 5 s on a loaded
    # machine (a full make test once): the calls get 30.
    mesh = await mesh_client(cluster=shared_cluster.cluster, timeout=30)
    queue = "big-payloads"
    results = await mesh.scheduler.enqueue_many(
        [NewJob(queue, "size", bytes([i]) * 1_000_000) for i in range(40)])
    assert all(isinstance(r, EnqueueResult) for r in results), [
        repr(r)[:300] for r in results if not isinstance(r, EnqueueResult)]
    claimed = await mesh.scheduler.claim(queue, max_jobs=40)
    assert 0 < len(claimed) < 40
    for job in claimed:
        await mesh.scheduler.complete(job.job_id, job.lease_token, b"")

    async def size(job: JobContext) -> bytes:
        return str(len(job.payload)).encode()

    async with Worker(mesh, [queue], {"size": size}, concurrency=40, poll=0.2) as worker:
        await _until(lambda: _done(worker, 40 - len(claimed)))
    assert worker.stats.lost == 0
    for result in results:
        assert isinstance(result, EnqueueResult)
        stored = await mesh.scheduler.get_job(result.job_id)
        assert stored.state is JobState.SUCCEEDED and len(stored.attempts) == 1


async def test_pages_of_dead_jobs_stop_at_3_mib_and_the_next_page_goes_on(mesh: Mesh) -> None:
    queue = "big-dead"
    for i in range(6):
        await mesh.scheduler.enqueue(queue, "t", bytes([i]) * 1_000_000)
    for job in await mesh.scheduler.claim(queue, max_jobs=6):
        await mesh.scheduler.fail(job.job_id, job.lease_token, "no", retryable=False)
    page = await mesh.scheduler.list_dead_letters(queue, page_size=100)
    assert 0 < len(page.jobs) < 6 and page.next_page_token and page.total == 6
    assert sum(len(job.payload) for job in page.jobs) <= 3 << 20
    every = [job.payload[0] async for job in mesh.scheduler.dead_letters(queue, page_size=100)]
    assert sorted(every) == list(range(6))
