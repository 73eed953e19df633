"""The last bad inputs an outside review found, against a real node, with the raw
generated stubs: each is INVALID_ARGUMENT with a BadRequest naming the field, never
UNKNOWN, never the (long) input echoed back, and no traceback in the node's log.

- Timestamps and Durations out of range (a run_at past 2262 overflowed int64
  nanoseconds; a ttl of 2**62 s gave an expire_time in year 146138514340);
- id-like fields far over their size (a 1 MB lease_id was echoed into the
  LOCK_NOT_HELD trailers, which then exceeded the metadata limit);
- page tokens that no List call gave.

Every service runs on the one module node (``shared_node``); names are distinct.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, message, timestamp_pb2

from common.bounds import MAX_DURATION_SECONDS
from common.errors import MAX_DETAIL_CHARS, MAX_MESSAGE_CHARS
from common.localmesh import LocalMesh
from mesh.cache.v1 import cache_pb2 as cpb
from mesh.cache.v1 import cache_pb2_grpc as cpb_grpc
from mesh.events.v1 import events_pb2 as epb
from mesh.events.v1 import events_pb2_grpc as epb_grpc
from mesh.lock.v1 import lock_pb2 as lpb
from mesh.lock.v1 import lock_pb2_grpc as lpb_grpc
from mesh.scheduler.v1 import scheduler_pb2 as spb
from mesh.scheduler.v1 import scheduler_pb2_grpc as spb_grpc
from tests.cluster import error_details

HUGE = duration_pb2.Duration(seconds=2**62)
OVER_100_YEARS = duration_pb2.Duration(seconds=MAX_DURATION_SECONDS + 1)
LONG = "z" * (1 << 20)  # 1 MiB: far over every id bound, under the 4 MiB message limit


def _at(year: int) -> timestamp_pb2.Timestamp:
    instant = datetime.datetime(year, 1, 1, tzinfo=datetime.UTC)
    return timestamp_pb2.Timestamp(seconds=int(instant.timestamp()))


@pytest.fixture
def node(shared_node: LocalMesh) -> LocalMesh:
    """The module's one node (every service)."""
    return shared_node


@pytest.fixture
async def channel(node: LocalMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(node.nodes[0].address) as opened:
        yield opened


def _no_traceback(node: LocalMesh) -> None:
    log = node.nodes[0].child.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


async def _invalid(node: LocalMesh, call: Any, field: str, long: str = LONG) -> None:
    """``call`` fails with INVALID_ARGUMENT naming ``field``, and quotes none of
    ``long``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    reason, metadata, violations = error_details(error)
    assert reason == "INVALID_ARGUMENT"
    assert field in violations, violations
    assert metadata.get("field") == field
    _bounded(error, long)
    _no_traceback(node)


def _bounded(error: grpc.aio.AioRpcError, long: str) -> None:
    """Nothing in the status is long, nor a long slice of ``long``."""
    details = error.details() or ""
    assert len(details) <= MAX_MESSAGE_CHARS
    assert long[:MAX_MESSAGE_CHARS + 1] not in details
    _, metadata, violations = error_details(error)
    for text in (*metadata.values(), *violations.values(), *violations):
        assert len(text) <= MAX_DETAIL_CHARS


# -- 1, 2: Timestamps and Durations --------------------------------------------------


def _enqueue(**fields: Any) -> spb.EnqueueRequest:
    return spb.EnqueueRequest(queue="bad-times", type="t", **fields)


def _schedule(**template: Any) -> spb.CreateScheduleRequest:
    return spb.CreateScheduleRequest(queue="bad-times", schedule_id="s", cron="@daily",
                                     template=spb.JobTemplate(type="t", **template))


@pytest.mark.parametrize(("request_", "method", "field"), [
    (_enqueue(run_at=_at(2263)), "Enqueue", "run_at"),
    (_enqueue(run_at=_at(9999)), "Enqueue", "run_at"),
    (_enqueue(run_at=_at(2200)), "Enqueue", "run_at"),
    (_enqueue(run_at=timestamp_pb2.Timestamp(seconds=-1)), "Enqueue", "run_at"),
    (_enqueue(run_at=timestamp_pb2.Timestamp(seconds=1, nanos=-1)), "Enqueue", "run_at"),
    (_enqueue(delay=HUGE), "Enqueue", "delay"),
    (_enqueue(delay=OVER_100_YEARS), "Enqueue", "delay"),
    (_enqueue(timeout=HUGE), "Enqueue", "timeout"),
    (_enqueue(unique_key="u", unique_ttl=HUGE), "Enqueue", "unique_ttl"),
    (_enqueue(retention=HUGE), "Enqueue", "retention"),
    (_enqueue(backoff=spb.Backoff(initial_delay=HUGE)), "Enqueue", "backoff.initial_delay"),
    (_enqueue(backoff=spb.Backoff(max_delay=HUGE)), "Enqueue", "backoff.max_delay"),
    (spb.ClaimRequest(queues=["bad-times"], worker_id="w", lease_duration=HUGE), "Claim",
     "lease_duration"),
    (spb.ClaimRequest(queues=["bad-times"], worker_id="w", wait=HUGE), "Claim", "wait"),
    (spb.HeartbeatRequest(job_id="{a}1-1", lease_token=1, extend=HUGE), "Heartbeat",
     "extend"),
    (spb.FailRequest(job_id="{a}1-1", lease_token=1, retry_delay=HUGE), "Fail",
     "retry_delay"),
    (_schedule(timeout=HUGE), "CreateSchedule", "template.timeout"),
    (_schedule(unique_ttl=HUGE), "CreateSchedule", "template.unique_ttl"),
    (_schedule(retention=HUGE), "CreateSchedule", "template.retention"),
    (_schedule(backoff=spb.Backoff(max_delay=HUGE)), "CreateSchedule",
     "template.backoff.max_delay"),
])
async def test_scheduler_times_out_of_range(node: LocalMesh, channel: Any,
                                            request_: message.Message, method: str,
                                            field: str) -> None:
    stub = spb_grpc.SchedulerServiceStub(channel)
    await _invalid(node, getattr(stub, method)(request_, timeout=10), field)


async def test_a_run_at_just_inside_the_bounds_is_kept(node: LocalMesh, channel: Any) -> None:
    stub = spb_grpc.SchedulerServiceStub(channel)
    late = _at(2199)
    reply = await stub.Enqueue(_enqueue(run_at=late), timeout=10)
    assert reply.run_time == late and reply.state == spb.JOB_STATE_SCHEDULED
    await stub.Cancel(spb.CancelRequest(job_id=reply.job_id), timeout=10)
    _no_traceback(node)


@pytest.mark.parametrize(("request_", "method", "field"), [
    (cpb.SetRequest(key="bad:ttl", value=b"v", ttl=HUGE), "Set", "ttl"),
    (cpb.SetRequest(key="bad:ttl", value=b"v", ttl=OVER_100_YEARS), "Set", "ttl"),
    (cpb.SetRequest(key="bad:ttl", value=b"v", ttl=duration_pb2.Duration(seconds=1, nanos=-1)),
     "Set", "ttl"),
    (cpb.SetRequest(key="bad:ttl", value=b"v", ttl=duration_pb2.Duration(nanos=10**9)),
     "Set", "ttl"),
    (cpb.MSetRequest(entries=[cpb.MSetEntry(key="bad:m", value=b"v", ttl=HUGE)]), "MSet",
     "entries[0].ttl"),
    (cpb.IncrRequest(key="bad:n", delta=1, ttl=HUGE), "Incr", "ttl"),
])
async def test_cache_ttls_out_of_range(node: LocalMesh, channel: Any,
                                       request_: message.Message, method: str,
                                       field: str) -> None:
    stub = cpb_grpc.CacheServiceStub(channel)
    await _invalid(node, getattr(stub, method)(request_, timeout=10), field)
    assert not (await stub.Get(cpb.GetRequest(key="bad:ttl"), timeout=10)).found


async def test_the_longest_cache_ttl_gives_a_valid_expire_time(node: LocalMesh,
                                                               channel: Any) -> None:
    stub = cpb_grpc.CacheServiceStub(channel)
    reply = await stub.Set(cpb.SetRequest(
        key="bad:longest", value=b"v", ttl=duration_pb2.Duration(seconds=MAX_DURATION_SECONDS)),
        timeout=10)
    expires = reply.expire_time.ToDatetime(tzinfo=datetime.UTC)  # raises if not valid
    assert 2100 < expires.year < 2200
    _no_traceback(node)


@pytest.mark.parametrize(("request_", "method", "field"), [
    (lpb.AcquireRequest(name="bad:lock", wait_timeout=HUGE), "Acquire", "wait_timeout"),
    (lpb.AcquireRequest(name="bad:lock", wait_timeout=OVER_100_YEARS), "Acquire",
     "wait_timeout"),
    (lpb.AcquireRequest(name="bad:lock", ttl=HUGE), "Acquire", "ttl"),
    (lpb.RefreshRequest(name="bad:lock", lease_id="l", ttl=HUGE), "Refresh", "ttl"),
])
async def test_lock_durations_out_of_range(node: LocalMesh, channel: Any,
                                           request_: message.Message, method: str,
                                           field: str) -> None:
    stub = lpb_grpc.LockServiceStub(channel)
    await _invalid(node, getattr(stub, method)(request_, timeout=10), field)


@pytest.mark.parametrize("max_age", [HUGE, OVER_100_YEARS, duration_pb2.Duration(nanos=-1)])
async def test_stream_max_age_out_of_range(node: LocalMesh, channel: Any,
                                           max_age: duration_pb2.Duration) -> None:
    stub = epb_grpc.EventsServiceStub(channel)
    await _invalid(node, stub.SetStreamMetadata(epb.SetStreamMetadataRequest(
        stream="bad-age", metadata=epb.StreamMetadata(max_age=max_age)), timeout=10),
        "metadata.max_age")


# -- 3: long ids -------------------------------------------------------------------


@pytest.mark.parametrize(("request_", "method", "field"), [
    (lpb.ReleaseRequest(name="bad:ids", lease_id=LONG), "Release", "lease_id"),
    (lpb.RefreshRequest(name="bad:ids", lease_id=LONG), "Refresh", "lease_id"),
    (lpb.ReleaseRequest(name="bad:ids", lease_id="l" * 65), "Release", "lease_id"),
    (lpb.AcquireRequest(name="bad:ids", owner=LONG), "Acquire", "owner"),
    (lpb.AcquireRequest(name="bad:ids", request_id=LONG), "Acquire", "request_id"),
    (lpb.DescribeRequest(name=LONG), "Describe", "name"),
])
async def test_long_lock_ids(node: LocalMesh, channel: Any, request_: message.Message,
                             method: str, field: str) -> None:
    stub = lpb_grpc.LockServiceStub(channel)
    await _invalid(node, getattr(stub, method)(request_, timeout=10), field)


@pytest.mark.parametrize(("request_", "method", "field"), [
    (spb.GetJobRequest(job_id=LONG), "GetJob", "job_id"),
    (spb.CancelRequest(job_id=LONG), "Cancel", "job_id"),
    (spb.CompleteRequest(job_id=LONG, lease_token=1), "Complete", "job_id"),
    (spb.RequeueDeadLettersRequest(queue="bad-ids", job_ids=["ok", LONG]),
     "RequeueDeadLetters", "job_ids[1]"),
    (spb.PurgeDeadLettersRequest(queue="bad-ids", job_ids=[LONG]), "PurgeDeadLetters",
     "job_ids[0]"),
    (spb.EnqueueRequest(queue="bad-ids", type="t", unique_key=LONG), "Enqueue", "unique_key"),
    (spb.ClaimRequest(queues=["bad-ids"], worker_id=LONG), "Claim", "worker_id"),
    (spb.CreateScheduleRequest(queue="bad-ids", schedule_id="s", cron="* " * 600,
                               template=spb.JobTemplate(type="t")), "CreateSchedule", "cron"),
    (spb.CreateScheduleRequest(queue="bad-ids", schedule_id="s", cron="@daily",
                               timezone=LONG, template=spb.JobTemplate(type="t")),
     "CreateSchedule", "timezone"),
])
async def test_long_scheduler_ids(node: LocalMesh, channel: Any, request_: message.Message,
                                  method: str, field: str) -> None:
    stub = spb_grpc.SchedulerServiceStub(channel)
    await _invalid(node, getattr(stub, method)(request_, timeout=10), field)


@pytest.mark.parametrize(("request_", "method", "field"), [
    (epb.AppendRequest(stream="bad-ids", events=[epb.EventData(id=LONG, type="T")]),
     "Append", "events[0].id"),
    (epb.ReadRequest(stream=LONG), "Read", "stream"),
])
async def test_long_event_ids(node: LocalMesh, channel: Any, request_: message.Message,
                              method: str, field: str) -> None:
    stub = epb_grpc.EventsServiceStub(channel)
    await _invalid(node, getattr(stub, method)(request_, timeout=10), field)


async def test_long_cache_key(node: LocalMesh, channel: Any) -> None:
    stub = cpb_grpc.CacheServiceStub(channel)
    await _invalid(node, stub.Get(cpb.GetRequest(key=LONG), timeout=10), "key")


async def test_errors_that_quote_valid_input_are_capped(node: LocalMesh,
                                                        channel: Any) -> None:
    """Inputs within their bounds may still be long (a 1024-byte lock name): the
    errors that quote them cut the quote, in the message and in ErrorInfo."""
    name = "n" * 1000
    locks = lpb_grpc.LockServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await locks.Release(lpb.ReleaseRequest(name=name, lease_id="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, metadata, _ = error_details(info.value)
    assert reason == "LOCK_NOT_HELD" and metadata["lease_id"] == "nope"
    assert metadata["name"].endswith("\u2026") and name.startswith(metadata["name"][:-1])
    _bounded(info.value, name)

    jobs = spb_grpc.SchedulerServiceStub(channel)
    job_id = "{q}" + "x" * 1000  # within the 1024-byte bound, but no such job
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await jobs.GetJob(spb.GetJobRequest(job_id=job_id), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    _bounded(info.value, job_id)
    _no_traceback(node)


# -- 4: page tokens ------------------------------------------------------------------


@pytest.mark.parametrize("token", ["%%%", "bad", "0:x", LONG, "é"])
@pytest.mark.parametrize("method", ["ListSchedules", "ListDeadLetters"])
async def test_page_tokens_nobody_gave(node: LocalMesh, channel: Any, method: str,
                                       token: str) -> None:
    stub = spb_grpc.SchedulerServiceStub(channel)
    request = getattr(spb, f"{method}Request")(queue="bad-pages", page_token=token)
    await _invalid(node, getattr(stub, method)(request, timeout=10), "page_token", token)


async def test_a_token_serves_only_its_own_list(node: LocalMesh, channel: Any) -> None:
    stub = spb_grpc.SchedulerServiceStub(channel)
    queue = "bad-pages-cross"
    for schedule_id in ("a", "b"):
        await stub.CreateSchedule(spb.CreateScheduleRequest(
            queue=queue, schedule_id=schedule_id, cron="@daily",
            template=spb.JobTemplate(type="t")), timeout=10)
    first = await stub.ListSchedules(spb.ListSchedulesRequest(queue=queue, page_size=1),
                                     timeout=10)
    assert [s.schedule_id for s in first.schedules] == ["a"] and first.next_page_token
    rest = await stub.ListSchedules(spb.ListSchedulesRequest(
        queue=queue, page_size=1, page_token=first.next_page_token), timeout=10)
    assert [s.schedule_id for s in rest.schedules] == ["b"]
    await _invalid(node, stub.ListDeadLetters(spb.ListDeadLettersRequest(
        queue=queue, page_token=first.next_page_token), timeout=10), "page_token")
    tampered = first.next_page_token[:-2] + ("AA" if first.next_page_token[-2:] != "AA"
                                             else "BB")
    await _invalid(node, stub.ListSchedules(spb.ListSchedulesRequest(
        queue=queue, page_token=tampered), timeout=10), "page_token")
