"""The gateway's pure parts, without a network: routes from the HTTP rules, request
transcoding and its field errors, error bodies, and an event stream whose node
goes silent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from clients.errors import VersionMismatchError
from common.errors import MAX_MESSAGE_CHARS
from gateway import sse
from gateway.__main__ import public_services
from gateway.errors import GatewayError, error_response, status_json
from gateway.positions import WatchPosition
from gateway.rules import RouteTable, parse_template, routes_of
from gateway.transcode import FieldError, request_of, to_json
from gateway.upstream import Call, Stream
from mesh.cache.v1 import cache_pb2

TABLE = RouteTable(routes_of(public_services()))


def find(method: str, path: str) -> Any:
    match = TABLE.find(method, path)
    assert match is not None and not isinstance(match, list), (method, path, match)
    return match


def test_every_public_rpc_but_none_internal_has_a_route() -> None:
    names = {r.name for r in TABLE.routes}
    for service in public_services():
        for method in service.methods:
            assert f"{service.full_name}/{method.name}" in names
    assert not any("Replication" in n for n in names)


def test_verbs_win_and_segments_decode() -> None:
    assert find("GET", "/v1/locks/orders:validate").route.method.name == "Validate"
    described = find("GET", "/v1/locks/orders%3Avalidate")
    assert (described.route.method.name, described.variables) == (
        "Describe", {"name": "orders:validate"})
    assert find("GET", "/v1/cache/a%2Fb").variables == {"key": "a/b"}
    assert find("GET", "/v1/cache:stats").route.method.name == "Stats"
    assert find("GET", "/v1/slots/12/events").variables == {"slot": "12"}
    assert TABLE.find("POST", "/v1/cache/k") == ["DELETE", "GET", "PUT"]
    assert TABLE.find("GET", "/v1/cache/") is None
    assert TABLE.find("GET", "/v1/cache/a/b") is None


@pytest.mark.parametrize("template", [
    "v1/x", "/v1/{a.b}", "/v1/{a=x/*}", "/v1/**", "/v1/{a=**}/b", "/v1//x"])
def test_unsupported_templates_fail_at_start(template: str) -> None:
    with pytest.raises(ValueError):
        parse_template(template)


def test_templates_parse() -> None:
    segments, verb = parse_template("/v1/streams/{stream}:append")
    assert verb == "append" and [s.field for s in segments] == ["", "", "stream"]
    rest, _ = parse_template("/v1/files/{path=**}")
    assert rest[-1].rest


def test_requests_merge_path_query_and_body() -> None:
    put = find("PUT", "/v1/cache/k")
    request = request_of(put.route, put.variables, [],
                         b'{"value": "aGk=", "ttl": "1.5s", "onlyIfVersion": "3"}')
    assert request == cache_pb2.SetRequest(
        key="k", value=b"hi", ttl=duration_pb2.Duration(seconds=1, nanos=500_000_000),
        only_if_version=3)
    watch = find("GET", "/v1/cache:watch")
    assert request_of(watch.route, {}, [("keys", "a"), ("keys", "b")], b"") == \
        cache_pb2.WatchRequest(keys=["a", "b"])
    get = find("GET", "/v1/cache/k")
    assert request_of(get.route, get.variables, [
        ("consistency", "READ_CONSISTENCY_LINEARIZABLE")], b"") == cache_pb2.GetRequest(
        key="k", consistency=cache_pb2.READ_CONSISTENCY_LINEARIZABLE)
    mget = find("POST", "/v1/cache:mget")
    assert request_of(mget.route, {}, [], b'{"keys": ["a", "b"], '
                      b'"consistency": "READ_CONSISTENCY_LINEARIZABLE"}') == cache_pb2.MGetRequest(
        keys=["a", "b"], consistency=cache_pb2.READ_CONSISTENCY_LINEARIZABLE)


@pytest.mark.parametrize(("method", "path", "query", "body", "field"), [
    ("PUT", "/v1/cache/k", [], b"{", "body"),
    ("PUT", "/v1/cache/k", [], b'"text"', "body"),
    ("PUT", "/v1/cache/k", [], b"[" * 100_000 + b"]" * 100_000, "body"),
    ("POST", "/v1/streams/s:append", [], b'{"events": [{"id": "' + b"x" * 10 + b'"}], '
     b'"expected_state": true}', "expected_state"),
    ("POST", "/v1/streams/s:append", [], b'{"events": [{"id": "a"}, {"id": false}]}',
     "events[1].id"),
    ("GET", "/v1/streams/s", [("max_count", "true")], b"", "max_count"),
    ("PUT", "/v1/cache/k", [], b'{"value": 1}', "value"),
    ("PUT", "/v1/cache/k", [], b'{"only_if_absent": "yes"}', "only_if_absent"),
    ("PUT", "/v1/cache/k", [], b'{"nope": 1}', "nope"),
    ("PUT", "/v1/cache/k", [("x", "1")], b"{}", "x"),
    ("GET", "/v1/cache/k", [], b"{}", "body"),
    ("GET", "/v1/cache/k", [("key", "other")], b"", "key"),
    ("POST", "/v1/streams/s:append", [], b'{"events": [{}, {"bad": 1}]}', "events[1].bad"),
    ("POST", "/v1/streams/s:append", [], b'{"events": [{}, {"data": 7}]}', "events[1].data"),
    ("GET", "/v1/streams/s", [("max_count", "many")], b"", "max_count"),
    ("GET", "/v1/streams/s", [("max_count", "1"), ("max_count", "2")], b"", "max_count"),
])
def test_bad_input_names_the_field(method: str, path: str, query: list[tuple[str, str]],
                                   body: bytes, field: str) -> None:
    match = find(method, path)
    with pytest.raises(FieldError) as caught:
        request_of(match.route, match.variables, query, body)
    assert caught.value.field == field


@pytest.mark.parametrize(("method", "path", "body", "field", "expected"), [
    ("POST", "/v1/locks/x:acquire", b'{"ttl": "soon"}', "ttl",
     'expected a duration in seconds such as "1.5s"'),
    ("POST", "/v1/locks/x:acquire", b'{"permits": "many"}', "permits",
     "expected an integer from 0 to 4294967295"),
    ("PUT", "/v1/cache/k", b'{"value": 5}', "value", "expected base64 text"),
    ("POST", "/v1/streams/s:append", b'{"events": "e"}', "events", "expected a list"),
    ("POST", "/v1/streams/s:append", b'{"events": [{"id": 5}]}', "events[0].id",
     "expected a string"),
    ("POST", "/v1/locks:acquireBatch", b'{"requests": [{"name": "a"}, {"permits": "x"}]}',
     "requests[1].permits", "expected an integer from 0 to 4294967295"),
    ("POST", "/v1/cache:mget", b'{"keys": ["a"], "consistency": "NOPE"}', "consistency",
     "expected one of READ_CONSISTENCY_UNSPECIFIED, READ_CONSISTENCY_LINEARIZABLE"),
])
def test_a_bad_value_says_what_the_field_takes(method: str, path: str, body: bytes,
                                                field: str, expected: str) -> None:
    """Not json_format's own words, which quote Python's exceptions ("invalid
    literal for int() with base 10", "object of type 'int' has no len()")."""
    match = find(method, path)
    with pytest.raises(FieldError) as caught:
        request_of(match.route, match.variables, [], body)
    assert (caught.value.field, caught.value.description) == (field, expected)


def test_responses_keep_proto_names_and_defaults() -> None:
    assert to_json(cache_pb2.GetResponse(version=7)) == {
        "found": False, "value": "", "version": "7"}


def test_error_bodies_are_rpc_statuses() -> None:
    error = VersionMismatchError("no", code=grpc.StatusCode.ABORTED, reason="VERSION_MISMATCH",
                                 metadata={"current_version": "4"})
    error.retry_after = 0.2
    body = status_json(error)
    assert body["code"] == 10 and body["message"] == "no"
    assert body["details"][0]["metadata"] == {"current_version": "4"}
    assert body["details"][1]["retry_delay"] == "0.200s"
    response = error_response(error)
    assert response.status_code == 409 and response.headers["retry-after"] == "1"


def test_an_error_body_quotes_input_capped() -> None:
    long = "x" * 10_000
    body = status_json(GatewayError(grpc.StatusCode.NOT_FOUND, f"no route for GET /{long}",
                                    "ROUTE_NOT_FOUND", metadata={"path": long},
                                    violations={long: long}))
    assert len(body["message"]) == MAX_MESSAGE_CHARS and body["message"].endswith("\u2026")
    assert body["details"][0]["metadata"] == {"path": "x" * 199 + "\u2026"}
    violation = body["details"][1]["field_violations"][0]
    assert violation["field"] == violation["description"] == "x" * 199 + "\u2026"
    assert len(json.dumps(body)) < 2_000


class _SilentCall:
    """A stream call that sends nothing after its first message."""

    def __init__(self) -> None:
        self.cancelled = False

    async def read(self) -> Any:
        await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


async def test_a_silent_stream_ends_with_an_error_event() -> None:
    first = cache_pb2.WatchResponse(created=True)
    first.heartbeat_interval.FromMilliseconds(100)
    call = _SilentCall()
    ended: list[bool] = []
    frames: AsyncIterator[bytes] = sse.events(
        WatchPosition(), Stream(call, first, "n:1"),
        keepalive=0.12, on_end=lambda: ended.append(True))
    received = [frame async for frame in frames]
    assert json.loads(received[0].decode().split("data: ", 1)[1])["created"] is True
    assert b": keepalive\n\n" in received
    last = received[-1].decode()
    assert last.startswith("event: error\n")
    status = json.loads(last.split("data: ", 1)[1])
    assert status["code"] == 14 and status["details"][0]["reason"] == "STREAM_SILENT"
    assert status["last_event_id"] == ""
    assert call.cancelled and ended == [True]


def test_last_event_id_resumes_a_subscription() -> None:
    from mesh.events.v1 import events_pb2

    request = events_pb2.SubscribeRequest(stream="s")
    sse.prepare("mesh.events.v1.EventsService.Subscribe", request, "41")
    assert request.after_version == 41 and request.HasField("heartbeat_interval")
    watch = cache_pb2.WatchRequest(keys=["k"])
    sse.prepare("mesh.cache.v1.CacheService.Watch", watch, "41")
    assert watch.HasField("heartbeat_interval")


def test_calls_route_by_their_path_variable() -> None:
    get = find("GET", "/v1/cache/k")
    assert Call(get.route, cache_pb2.GetRequest(key="k"), "").routing() == ("key", "k")
    read_all = find("GET", "/v1/slots/12/events")
    from mesh.events.v1 import events_pb2
    assert Call(read_all.route, events_pb2.ReadAllRequest(slot=12), "").routing() == (
        "slot", 12)
    watch = find("GET", "/v1/cache:watch")
    call = Call(watch.route, cache_pb2.WatchRequest(keys=["b", "c"]), "")
    assert call.routing() is None and call.entry() == "b"
    mget = find("POST", "/v1/cache:mget")
    assert Call(mget.route, cache_pb2.MGetRequest(keys=["a"]), "").entry() is None


def test_a_requested_wait_extends_the_deadline() -> None:
    from mesh.lock.v1 import lock_pb2
    from mesh.scheduler.v1 import scheduler_pb2

    acquire = find("POST", "/v1/locks/l:acquire")
    request = lock_pb2.AcquireRequest(name="l")
    request.wait_timeout.FromSeconds(30)
    assert Call(acquire.route, request, "").wait() == 30.0
    claim = find("POST", "/v1/jobs:claim")
    polled = scheduler_pb2.ClaimRequest(queues=["q"])
    polled.wait.FromMilliseconds(1500)
    assert Call(claim.route, polled, "").wait() == 1.5
    get = find("GET", "/v1/cache/k")
    assert Call(get.route, cache_pb2.GetRequest(key="k"), "").wait() == 0.0


def test_a_notification_cursor_carries_every_channel_and_resumes_a_request() -> None:
    from gateway.positions import CursorError, NotifyPosition
    from mesh.notify.v1 import notify_pb2

    position = NotifyPosition()
    assert position.cursor() == ""
    state = notify_pb2.SubscribeResponse(state=notify_pb2.ChannelState(
        channel="a", epoch="e1", offset=4, recovered=True))
    assert position.see(state)
    assert position.see(notify_pb2.SubscribeResponse(
        publication=notify_pb2.Publication(channel="a", offset=5)))
    assert position.see(notify_pb2.SubscribeResponse(state=notify_pb2.ChannelState(
        inbox="ann", epoch="i1", offset=2)))
    assert position.see(notify_pb2.SubscribeResponse(
        inbox_item=notify_pb2.InboxItem(user="ann", cursor=3)))
    assert not position.see(notify_pb2.SubscribeResponse(heartbeat=notify_pb2.Heartbeat()))
    again = NotifyPosition()
    again.restore(position.cursor())
    request = notify_pb2.SubscribeRequest(
        channels=[notify_pb2.ChannelSubscription(channel="a"),
                  notify_pb2.ChannelSubscription(channel="b")], inbox="ann")
    again.apply(request)
    assert (request.channels[0].since.epoch, request.channels[0].since.offset) == ("e1", 5)
    assert not request.channels[1].HasField("since")
    assert (request.inbox_since.epoch, request.inbox_since.offset) == ("i1", 3)
    for bad in ("5", "{}", '{"c": {"a": ["e", -1]}}', '{"c": []}', "[1]"):
        with pytest.raises(CursorError):
            NotifyPosition().restore(bad)


def test_an_event_cursor_is_a_version_and_a_watch_ignores_one() -> None:
    from gateway.positions import CursorError, EventsPosition
    from mesh.events.v1 import events_pb2

    position = EventsPosition()
    with pytest.raises(CursorError):
        position.restore("v7")
    position.restore("7")
    request = events_pb2.SubscribeRequest(stream="s")
    position.apply(request)
    assert request.after_version == 7
    watch = WatchPosition()
    watch.restore("12")  # what a reconnecting EventSource sends: a watch starts from now
    assert watch.cursor() == ""


def test_the_listening_socket_is_tcp_so_asyncio_sets_nodelay() -> None:
    """A socket of protocol 0 kept Nagle on for every accepted connection (asyncio
    sets TCP_NODELAY only on sockets that say they are TCP): ~40 ms per
    keep-alive request."""
    import socket

    from gateway.__main__ import _bind

    sock = _bind("127.0.0.1:0")
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
