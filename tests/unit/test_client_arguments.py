"""What the typed client does with arguments no request can carry: a NaN, an
infinity or 1e30 seconds, or an int past its field's range, is an
InvalidArgumentError naming the request's field (as a node names it), a value of
the wrong type a TypeError saying what was expected; nothing is sent. Before,
these came out of protobuf or the router as ``ValueError: cannot convert float
NaN to integer``, ``ValueError: Value out of range: -1`` or ``AttributeError:
'NoneType' object has no attribute 'find'``."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import cast

import pytest
from google.protobuf.message import Message

from clients import Mesh, NewJob
from clients.cache_watch import CacheWatch
from clients.durations import duration, seconds, timestamp
from clients.errors import InvalidArgumentError
from clients.events import EventsClient
from clients.requests import build
from clients.router import Router
from clients.saga import SagaType
from clients.scheduler import _enqueue_requests
from mesh.cache.v1 import cache_pb2 as cache_pb
from mesh.events.v1 import events_pb2 as events_pb
from tests.unit.test_lock_client import ScriptedLocks, granted


def test_seconds_become_durations_exactly() -> None:
    d = duration(1.5, "ttl")
    assert (d.seconds, d.nanos) == (1, 500_000_000)
    d = duration(3, "ttl")
    assert (d.seconds, d.nanos) == (3, 0)
    d = duration(timedelta(days=2, microseconds=7), "ttl")
    assert (d.seconds, d.nanos) == (172_800, 7_000)
    d = duration(-2.25, "ttl")  # the node says whether a field takes it
    assert d.ToNanoseconds() == -2_250_000_000
    assert timestamp(1_700_000_000.25, "run_at").ToNanoseconds() == 1_700_000_000_250_000_000


@pytest.mark.parametrize(("value", "why"), [
    (math.nan, "must be a finite number of seconds"),
    (math.inf, "must be a finite number of seconds"),
    (-math.inf, "must be a finite number of seconds"),
    (1e30, "must be at most 100 years"),
    (10**30, "must be at most 100 years"),
    (-1e30, "must not be negative"),
    (timedelta(days=40_000), "must be at most 100 years"),
])
def test_what_no_duration_holds_is_refused_naming_the_field(value: float, why: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        duration(value, "backoff.max_delay")
    assert info.value.field_violations == {"backoff.max_delay": why}
    assert info.value.message == f"backoff.max_delay: {why}"


@pytest.mark.parametrize("value", [-1.0, 1e12, math.nan])
def test_a_run_time_outside_what_nodes_accept_is_refused(value: float) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        timestamp(value, "run_at")
    assert list(info.value.field_violations) == ["run_at"]


@pytest.mark.parametrize("value", ["5", None, True, b"1"])
def test_seconds_of_the_wrong_type_are_a_type_error_naming_the_field(value: object) -> None:
    with pytest.raises(TypeError, match=r"^wait: a number of seconds or a timedelta, not "):
        seconds(value, "wait")  # type: ignore[arg-type]


def test_a_run_time_of_the_wrong_type_says_what_a_run_time_is() -> None:
    with pytest.raises(TypeError, match=r"^run_at: Unix seconds, not timedelta$"):
        timestamp(timedelta(seconds=5), "run_at")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^run_at: an aware datetime or Unix seconds, not str$"):
        NewJob("q", "t", run_at="tomorrow").to_proto()  # type: ignore[arg-type]


def test_a_key_that_is_not_a_string_is_a_type_error() -> None:
    router = Router(None, [("n1", "127.0.0.1:1")])
    assert router.for_key("k").address == "127.0.0.1:1"
    for key in (None, 5, 2.5):
        with pytest.raises(TypeError, match=f"is a str, not {type(key).__name__}$"):
            router.for_key(key)  # type: ignore[arg-type]


async def test_the_lock_client_refuses_before_sending() -> None:
    locks = ScriptedLocks(Acquire=[])
    with pytest.raises(InvalidArgumentError) as info:
        await locks.acquire("orders", ttl=math.nan)
    assert info.value.field_violations == {"ttl": "must be a finite number of seconds"}
    with pytest.raises(InvalidArgumentError) as info:
        await locks.acquire("orders", ttl=5, wait=math.nan)
    assert list(info.value.field_violations) == ["wait_timeout"]
    with pytest.raises(InvalidArgumentError):
        await locks.acquire("orders", ttl=5, wait=-1)
    assert locks.sent == []


async def test_an_infinite_wait_is_waiting_as_long_as_it_takes() -> None:
    locks = ScriptedLocks(Acquire=[granted()])
    lease = await locks.acquire("orders", ttl=timedelta(seconds=30), wait=math.inf)  # type: ignore[arg-type]
    assert lease.ttl == 30.0
    [request] = locks.requests("Acquire")
    assert request.ttl.seconds == 30


def test_a_batch_names_the_job_it_cannot_send() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        _enqueue_requests([NewJob("q", "t"), NewJob("q", "t", delay=math.nan)])
    assert info.value.field_violations == {"jobs[1].delay": "must be a finite number of seconds"}
    assert info.value.message == "jobs[1].delay: must be a finite number of seconds"
    with pytest.raises(TypeError, match=r"^jobs\[0\]: a NewJob, not dict$"):
        _enqueue_requests([{"queue": "q"}])  # type: ignore[list-item]


async def test_events_that_are_not_new_events_are_a_type_error() -> None:
    events = EventsClient.__new__(EventsClient)  # refused before it needs a mesh
    with pytest.raises(TypeError, match=r"^events\[0\]: a NewEvent, not dict$"):
        await events.append("s", [{"type": "t"}])  # type: ignore[list-item]


def test_a_watch_checks_its_heartbeat_interval_where_it_is_given() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        CacheWatch(cast(Mesh, None), ["k"], [], heartbeat_interval=math.nan)
    assert list(info.value.field_violations) == ["heartbeat_interval"]


@pytest.mark.parametrize(("request_type", "fields", "field", "why"), [
    (events_pb.ReadRequest, {"stream": "s", "max_count": -1}, "max_count",
     "must be from 0 to 4294967295"),
    (events_pb.ReadRequest, {"stream": "s", "from_version": 1 << 64}, "from_version",
     "must be from 0 to 18446744073709551615"),
    (cache_pb.IncrRequest, {"key": "k", "delta": 1 << 63}, "delta",
     f"must be from {-(1 << 63)} to {(1 << 63) - 1}"),
])
def test_an_int_no_field_holds_is_refused_naming_the_field(
        request_type: type[Message], fields: dict[str, object], field: str, why: str) -> None:
    """protobuf says only "Value out of range: -1"; the caller learns which field and
    its range (the value is not repeated: an int can have any number of digits)."""
    with pytest.raises(InvalidArgumentError) as info:
        build(request_type)(**fields)
    assert info.value.field_violations == {field: why}
    assert info.value.message == f"{field}: {why}"


def test_a_value_of_the_wrong_type_is_a_type_error_naming_the_field() -> None:
    with pytest.raises(TypeError, match=r"^max_count: an int, not str$"):
        build(events_pb.ReadRequest)(stream="s", max_count="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^stream: a str, not int$"):
        build(events_pb.ReadRequest)(stream=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^events\[1\]: an EventData, not int$"):
        build(events_pb.AppendRequest)(stream="s", events=[events_pb.EventData(), 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^events: a list of EventData, not int$"):
        build(events_pb.AppendRequest)(stream="s", events=7)  # type: ignore[arg-type]


def test_a_field_the_request_lacks_is_the_clients_own_mistake_in_protobufs_words() -> None:
    with pytest.raises(ValueError, match='has no "strem" field'):
        build(events_pb.ReadRequest)(strem="s")  # type: ignore[call-arg]
    assert build(events_pb.ReadRequest)(stream="s", from_version=None).HasField(
        "from_version") is False  # None leaves a field unset, as the constructor does


async def test_the_clients_refuse_an_int_out_of_range_before_sending() -> None:
    locks = ScriptedLocks(Acquire=[])
    with pytest.raises(InvalidArgumentError) as info:
        await locks.acquire("orders", ttl=5, permits=-1)
    assert list(info.value.field_violations) == ["permits"]
    assert locks.sent == []
    events = EventsClient.__new__(EventsClient)  # refused before it needs a mesh
    with pytest.raises(InvalidArgumentError) as info:
        await events.read("s", max_count=-1)
    assert list(info.value.field_violations) == ["max_count"]
    with pytest.raises(TypeError, match=r"^from_version: an int, not str$"):
        await events.read("s", "3")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError) as info:
        _enqueue_requests([NewJob("q", "t"), NewJob("q", "t", priority=-1)])
    assert list(info.value.field_violations) == ["jobs[1].priority"]


def test_a_saga_step_names_its_place_in_the_definition() -> None:
    order = SagaType("order", queue="q")

    @order.step("reserve")
    async def reserve(ctx: object) -> None: ...

    @order.step("charge", max_attempts=-1)
    async def charge(ctx: object) -> None: ...

    with pytest.raises(InvalidArgumentError) as info:
        order.definition()
    assert list(info.value.field_violations) == ["stages[1].steps[0].action.max_attempts"]
