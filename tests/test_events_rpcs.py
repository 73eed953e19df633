"""EventsService over the wire, against a real three-node mesh (R = 1), with the
raw generated stub: what any gRPC language sees (numbering, codes, reasons,
named fields, paging, subscriptions, retention, forwarding)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from common.clustermap import read_map
from common.localmesh import LocalMesh
from common.slots import slot_for
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_pb2_grpc as pb_grpc
from tests.cluster import error_details
from tests.conftest import non_owner

Stub = pb_grpc.EventsServiceStub


def _events(*ids: str, data: bytes = b"{}") -> list[pb.EventData]:
    return [pb.EventData(id=i, type="Happened", data=data, content_type="application/json")
            for i in ids]


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _owner(local: LocalMesh, slot: int) -> str:
    """Address of the node leading ``slot``."""
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    group = table.group_of_slot(slot)
    assert group is not None
    return table.addresses[group.primary]


@pytest.fixture
def stub_at(channel_at: Callable[[str], grpc.aio.Channel]) -> Callable[[str], Stub]:
    return lambda address: Stub(channel_at(address))


@pytest.fixture
def stub(shared_cluster: LocalMesh, stub_at: Any) -> Stub:
    """Any node: most streams are led elsewhere and forwarded."""
    return stub_at(shared_cluster.nodes[0].address)  # type: ignore[no-any-return]


async def test_append_and_read_forward_and_backward_in_pages(stub: Stub) -> None:
    first = await stub.Append(pb.AppendRequest(stream="rpc-page", events=_events("a", "b")))
    assert (first.first_version, first.last_version) == (1, 2) and not first.duplicate
    assert first.slot == slot_for("rpc-page") and first.position >= 2
    second = await stub.Append(pb.AppendRequest(
        stream="rpc-page", events=_events(*(f"e{i}" for i in range(3, 8)))))
    assert (second.first_version, second.last_version) == (3, 7)
    assert second.position == first.position + 5  # one append: contiguous positions

    page = await stub.Read(pb.ReadRequest(stream="rpc-page", max_count=3))
    assert [e.version for e in page.events] == [1, 2, 3] and not page.end_of_stream
    assert page.last_version == 7 and page.stream_exists
    event = page.events[0]
    assert (event.stream, event.id, event.type, event.data) == ("rpc-page", "a", "Happened",
                                                                 b"{}")
    assert event.content_type == "application/json" and event.create_time.seconds > 0
    rest = await stub.Read(pb.ReadRequest(stream="rpc-page", from_version=page.next_version))
    assert [e.version for e in rest.events] == [4, 5, 6, 7] and rest.end_of_stream
    back = await stub.Read(pb.ReadRequest(stream="rpc-page", max_count=4,
                                          direction=pb.READ_DIRECTION_BACKWARD))
    assert [e.version for e in back.events] == [7, 6, 5, 4] and back.next_version == 3
    tail = await stub.Read(pb.ReadRequest(stream="rpc-page", from_version=back.next_version,
                                          direction=pb.READ_DIRECTION_BACKWARD))
    assert [e.version for e in tail.events] == [3, 2, 1] and tail.end_of_stream
    none = await stub.Read(pb.ReadRequest(stream="rpc-nothing"))
    assert not none.events and none.end_of_stream and not none.stream_exists
    assert none.last_version == 0


async def test_expected_states(stub: Stub) -> None:
    s = "rpc-expect"
    error = await _error(stub.Append(pb.AppendRequest(
        stream=s, events=_events("x"), expected_state=pb.EXPECTED_STATE_STREAM_EXISTS)))
    reason, metadata, _ = error_details(error)
    assert error.code() == grpc.StatusCode.ABORTED and reason == "VERSION_MISMATCH"
    assert metadata == {"current_version": "0", "stream_exists": "false"}
    await stub.Append(pb.AppendRequest(stream=s, events=_events("a"),
                                       expected_state=pb.EXPECTED_STATE_NO_STREAM))
    error = await _error(stub.Append(pb.AppendRequest(
        stream=s, events=_events("b"), expected_state=pb.EXPECTED_STATE_NO_STREAM)))
    assert error_details(error)[1] == {"current_version": "1", "stream_exists": "true"}
    await stub.Append(pb.AppendRequest(stream=s, events=_events("b"),
                                       expected_state=pb.EXPECTED_STATE_STREAM_EXISTS))
    ok = await stub.Append(pb.AppendRequest(stream=s, events=_events("c"),
                                            expected_state=pb.EXPECTED_STATE_EXACT,
                                            exact_version=2))
    assert ok.last_version == 3
    error = await _error(stub.Append(pb.AppendRequest(
        stream=s, events=_events("d"), expected_state=pb.EXPECTED_STATE_EXACT,
        exact_version=2)))
    assert error.code() == grpc.StatusCode.ABORTED
    assert error_details(error)[1]["current_version"] == "3"
    anything = await stub.Append(pb.AppendRequest(stream=s, events=_events("d"),
                                                  expected_state=pb.EXPECTED_STATE_ANY))
    assert anything.first_version == 4


async def test_idempotent_retries(stub: Stub) -> None:
    s = "rpc-idem"
    request = pb.AppendRequest(stream=s, events=_events("i1", "i2", "i3"),
                               expected_state=pb.EXPECTED_STATE_NO_STREAM)
    original = await stub.Append(request)
    retry = await stub.Append(request)  # NO_STREAM would fail: idempotency comes first
    assert retry.duplicate
    assert (retry.first_version, retry.last_version, retry.slot, retry.position) == (
        original.first_version, original.last_version, original.slot, original.position)
    page = await stub.Read(pb.ReadRequest(stream=s))
    assert [e.id for e in page.events] == ["i1", "i2", "i3"]
    for ids in (["i3", "i4"], ["i2", "i1"]):
        error = await _error(stub.Append(pb.AppendRequest(stream=s, events=_events(*ids))))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error_details(error)[0] == "DUPLICATE_EVENT_ID"
    assert (await stub.Read(pb.ReadRequest(stream=s))).last_version == 3


BIG = 1 << 20


@pytest.mark.parametrize(("request_", "field"), [
    (pb.AppendRequest(stream="", events=_events("a")), "stream"),
    (pb.AppendRequest(stream="x" * 1025, events=_events("a")), "stream"),
    (pb.AppendRequest(stream="rpc-bad"), "events"),
    (pb.AppendRequest(stream="rpc-bad", events=[pb.EventData(type="T")]), "events[0].id"),
    (pb.AppendRequest(stream="rpc-bad", events=[*_events("a"), pb.EventData(id="b")]),
     "events[1].type"),
    (pb.AppendRequest(stream="rpc-bad", events=_events("a", "a")), "events[1].id"),
    (pb.AppendRequest(stream="rpc-bad", events=[pb.EventData(id="i" * 129, type="T")]),
     "events[0].id"),
    (pb.AppendRequest(stream="rpc-bad", events=[
        pb.EventData(id="a", type="T", data=b"x" * BIG, metadata=b"m")]), "events[0].data"),
    (pb.AppendRequest(stream="rpc-bad", events=_events(*(f"e{i}" for i in range(17)),
                                                       data=b"x" * BIG)), "events"),
    (pb.AppendRequest(stream="rpc-bad", events=_events("a"),
                      expected_state=pb.EXPECTED_STATE_EXACT), "exact_version"),
    (pb.ReadRequest(stream=""), "stream"),
    (pb.ReadAllRequest(slot=16384), "slot"),
    (pb.SetStreamMetadataRequest(stream="rpc-bad", metadata=pb.StreamMetadata(
        max_age=duration_pb2.Duration(seconds=-1))), "metadata.max_age"),
    (pb.DeleteStreamRequest(stream=""), "stream"),
])
async def test_invalid_arguments_name_the_field(stub: Stub, request_: Any, field: str) -> None:
    method = {pb.AppendRequest: stub.Append, pb.ReadRequest: stub.Read,
              pb.ReadAllRequest: stub.ReadAll, pb.SetStreamMetadataRequest:
              stub.SetStreamMetadata, pb.DeleteStreamRequest: stub.DeleteStream}[type(request_)]
    error = await _error(method(request_, timeout=10))
    reason, metadata, violations = error_details(error)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_ARGUMENT"
    assert list(violations) == [field] and metadata["field"] == field


async def test_read_all_of_a_slot(stub: Stub) -> None:
    streams = ["{rpc-all}a", "{rpc-all}b"]
    slot = slot_for(streams[0])
    for i in range(3):
        for s in streams:
            await stub.Append(pb.AppendRequest(stream=s, events=_events(f"{s}-{i}")))
    page = await stub.ReadAll(pb.ReadAllRequest(slot=slot, max_count=4))
    assert [(e.stream, e.version) for e in page.events] == [
        ("{rpc-all}a", 1), ("{rpc-all}b", 1), ("{rpc-all}a", 2), ("{rpc-all}b", 2)]
    positions = [e.position for e in page.events]
    assert positions == sorted(positions) and not page.end_of_log
    rest = await stub.ReadAll(pb.ReadAllRequest(slot=slot, from_position=page.next_position))
    assert len(rest.events) == 2 and rest.end_of_log
    assert rest.last_position == rest.events[-1].position
    back = await stub.ReadAll(pb.ReadAllRequest(slot=slot, max_count=2,
                                                direction=pb.READ_DIRECTION_BACKWARD))
    assert [e.position for e in back.events] == [rest.last_position, rest.last_position - 1]


async def _next(call: Any, kind: str | None = None) -> pb.SubscribeResponse:
    message: pb.SubscribeResponse = await asyncio.wait_for(call.read(), 10)
    assert message is not grpc.aio.EOF
    if kind is not None:
        assert message.WhichOneof("content") == kind, message
    return message


@pytest.mark.parametrize("via", ["owner", "forwarded"])
async def test_stream_subscription_catches_up_then_goes_live(
        shared_cluster: LocalMesh, stub_at: Any, via: str) -> None:
    s = f"rpc-sub-{via}"
    owner = await _owner(shared_cluster, slot_for(s))
    entry = owner if via == "owner" else non_owner(shared_cluster, s)[0]
    stub = stub_at(entry)
    await stub.Append(pb.AppendRequest(stream=s, events=_events("a", "b", "c")))
    call = stub.Subscribe(pb.SubscribeRequest(stream=s, after_version=1), timeout=30)
    assert (await _next(call, "confirmation")).confirmation.subscription_id
    assert [(await _next(call, "event")).event.version for _ in range(2)] == [2, 3]
    assert (await _next(call, "caught_up")).caught_up.version == 3
    writer = asyncio.create_task(_append_each(stub, s, [f"live{i}" for i in range(20)]))
    live = [(await _next(call, "event")).event for _ in range(20)]
    await writer
    assert [e.version for e in live] == list(range(4, 24))
    assert [e.id for e in live] == [f"live{i}" for i in range(20)]
    call.cancel()


async def _append_each(stub: Stub, stream: str, ids: list[str]) -> None:
    for event_id in ids:
        await stub.Append(pb.AppendRequest(stream=stream, events=_events(event_id)))


async def test_idle_subscriptions_carry_heartbeats(stub: Stub) -> None:
    """The confirmation gives the heartbeat interval: the node's (5 s by default),
    or the request's own, bounded to at least 1 s; an idle stream then carries a
    Heartbeat every interval (through a forwarding node too)."""
    s = "rpc-heartbeat"
    call = stub.Subscribe(pb.SubscribeRequest(stream=s), timeout=30)
    assert (await _next(call, "confirmation")).confirmation.heartbeat_interval.seconds == 5
    call.cancel()
    call = stub.Subscribe(pb.SubscribeRequest(
        stream=s, heartbeat_interval=duration_pb2.Duration(nanos=10_000_000)), timeout=30)
    interval = (await _next(call, "confirmation")).confirmation.heartbeat_interval
    assert interval.ToNanoseconds() == 1_000_000_000
    await _next(call, "caught_up")
    first = (await _next(call, "heartbeat")).heartbeat.server_time.ToNanoseconds()
    second = (await _next(call, "heartbeat")).heartbeat.server_time.ToNanoseconds()
    # The node's own stamps: the clamped one-second interval, not the asked-for 10 ms.
    assert 0.95e9 <= second - first < 2.5e9, second - first
    call.cancel()

    bad = stub.Subscribe(pb.SubscribeRequest(
        stream=s, heartbeat_interval=duration_pb2.Duration(seconds=-1)), timeout=10)
    error = await _error(bad.read())
    _reason, metadata, _violations = error_details(error)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata["field"] == "heartbeat_interval"


async def test_subscription_from_the_end_sees_only_new_events(stub: Stub) -> None:
    s = "rpc-sub-end"
    await stub.Append(pb.AppendRequest(stream=s, events=_events("old")))
    call = stub.Subscribe(pb.SubscribeRequest(stream=s, start=pb.SUBSCRIBE_START_END),
                          timeout=30)
    await _next(call, "confirmation")
    assert (await _next(call, "caught_up")).caught_up.version == 1
    await stub.Append(pb.AppendRequest(stream=s, events=_events("new")))
    assert (await _next(call, "event")).event.id == "new"
    call.cancel()


async def test_category_subscription_with_checkpoints(
        shared_cluster: LocalMesh, stub_at: Any) -> None:
    slot = slot_for("{rpc-cat}")
    stub = stub_at(await _owner(shared_cluster, slot))
    for i in range(6):
        await stub.Append(pb.AppendRequest(stream=f"{{rpc-cat}}order-{i}",
                                           events=_events(f"o{i}")))
        await stub.Append(pb.AppendRequest(stream=f"{{rpc-cat}}user-{i}",
                                           events=_events(f"u{i}")))
    request = pb.SubscribeRequest(category="{rpc-cat}order-",
                                  slots=[pb.SlotRange(start=slot, end=slot)],
                                  checkpoint_interval=4)
    call = stub.Subscribe(request, timeout=30)
    await _next(call, "confirmation")
    seen: list[str] = []
    checkpoints: list[int] = []
    while True:
        message = await _next(call)
        kind = message.WhichOneof("content")
        if kind == "event":
            seen.append(message.event.id)
        elif kind == "checkpoint":
            checkpoints.append(message.checkpoint.positions[slot])
        else:
            assert kind == "caught_up"
            caught_up = message.caught_up.positions[slot]
            break
    assert seen == [f"o{i}" for i in range(6)]
    assert len(checkpoints) == 3 and checkpoints == sorted(checkpoints)
    live = await stub.Append(pb.AppendRequest(stream="{rpc-cat}order-9", events=_events("o9")))
    assert (await _next(call, "event")).event.position == live.position > caught_up
    call.cancel()
    # Resuming from the caught-up point delivers only what came after it.
    request.after_positions[slot] = caught_up
    again = stub.Subscribe(request, timeout=30)
    await _next(again, "confirmation")
    assert (await _next(again, "event")).event.id == "o9"
    again.cancel()


async def test_subscribing_to_slots_led_elsewhere_is_wrong_owner(
        shared_cluster: LocalMesh, stub_at: Any) -> None:
    slot = slot_for("{rpc-cat}")
    stub = stub_at(non_owner(shared_cluster, "{rpc-cat}")[0])
    call = stub.Subscribe(pb.SubscribeRequest(all=pb.AllStreams(),
                                              slots=[pb.SlotRange(start=slot, end=slot)]),
                          timeout=10)
    error = await _error(call.read())
    reason, metadata, _ = error_details(error)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and reason == "WRONG_OWNER"
    assert metadata["owner_address"] == await _owner(shared_cluster, slot)


async def test_metadata_max_count_truncates(stub: Stub) -> None:
    s = "rpc-maxcount"
    await stub.Append(pb.AppendRequest(stream=s, events=_events(*(f"m{i}" for i in range(5)))))
    assert (await stub.GetStreamMetadata(pb.GetStreamMetadataRequest(stream=s))
            ).metadata_version == 0
    set_ = await stub.SetStreamMetadata(pb.SetStreamMetadataRequest(
        stream=s, metadata=pb.StreamMetadata(max_count=2), expected_metadata_version=0))
    assert set_.metadata_version == 1
    page = await stub.Read(pb.ReadRequest(stream=s))
    assert [e.version for e in page.events] == [4, 5] and page.last_version == 5
    got = await stub.GetStreamMetadata(pb.GetStreamMetadataRequest(stream=s))
    assert got.metadata.max_count == 2 and got.metadata_version == 1
    error = await _error(stub.SetStreamMetadata(pb.SetStreamMetadataRequest(
        stream=s, metadata=pb.StreamMetadata(), expected_metadata_version=0)))
    assert error.code() == grpc.StatusCode.ABORTED
    assert error_details(error) == ("VERSION_MISMATCH", {"current_version": "1"}, {})
    await stub.Append(pb.AppendRequest(stream=s, events=_events("m5")))
    page = await stub.Read(pb.ReadRequest(stream=s))
    assert [e.version for e in page.events] == [5, 6]


async def test_soft_delete_then_append_continues_the_versions(stub: Stub) -> None:
    s = "rpc-soft"
    await stub.Append(pb.AppendRequest(stream=s, events=_events("a", "b")))
    deleted = await stub.DeleteStream(pb.DeleteStreamRequest(
        stream=s, expected_state=pb.EXPECTED_STATE_EXACT, exact_version=2))
    assert deleted.last_version == 2
    page = await stub.Read(pb.ReadRequest(stream=s))
    assert not page.events and not page.stream_exists and page.last_version == 2
    got = await stub.GetStreamMetadata(pb.GetStreamMetadataRequest(stream=s))
    assert got.metadata.truncate_before == 3
    again = await stub.Append(pb.AppendRequest(stream=s, events=_events("c"),
                                               expected_state=pb.EXPECTED_STATE_NO_STREAM))
    assert again.first_version == 3
    page = await stub.Read(pb.ReadRequest(stream=s))
    assert [e.id for e in page.events] == ["c"] and page.stream_exists
    nothing = await stub.DeleteStream(pb.DeleteStreamRequest(stream="rpc-soft-never"))
    assert nothing.last_version == 0


async def test_tombstone_blocks_the_stream_forever(stub: Stub) -> None:
    s = "rpc-tomb"
    await stub.Append(pb.AppendRequest(stream=s, events=_events("a")))
    tomb = await stub.TombstoneStream(pb.TombstoneStreamRequest(stream=s))
    assert tomb.last_version == 1
    for call in (stub.Append(pb.AppendRequest(stream=s, events=_events("b"))),
                 stub.Read(pb.ReadRequest(stream=s)),
                 stub.TombstoneStream(pb.TombstoneStreamRequest(stream=s))):
        error = await _error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(error)[0] == "STREAM_DELETED"


async def test_a_non_owner_forwards(shared_cluster: LocalMesh, stub_at: Any) -> None:
    s = "rpc-forward"
    owner = await _owner(shared_cluster, slot_for(s))
    for entry in non_owner(shared_cluster, s):
        stub = stub_at(entry)
        response = await stub.Append(pb.AppendRequest(stream=s, events=_events(entry)))
        assert response.slot == slot_for(s)
    page = await stub_at(owner).Read(pb.ReadRequest(stream=s))
    assert [e.id for e in page.events] == non_owner(shared_cluster, s)
    # A caller that routes by itself is told where to go instead.
    error = await _error(stub_at(non_owner(shared_cluster, s)[0]).Read(
        pb.ReadRequest(stream=s), metadata=(("x-mesh-route", "client"),)))
    reason, metadata, _ = error_details(error)
    assert reason == "WRONG_OWNER" and metadata["owner_address"] == owner
