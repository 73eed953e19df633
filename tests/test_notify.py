"""NotifyService against a real three-node mesh (R = 1), two ways. With the raw
generated stub, what any gRPC language sees: offsets and epochs, recovery, replay
then live, the subscriber buffer, inboxes, presence, codes, reasons, named
fields, forwarding, fan-out and memory. Through ``mesh.notify`` (and SyncMesh,
meshctl): subscriptions across nodes resumed from their positions, patterns,
inboxes, presence events. One module, so both share one cluster."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from clients import (
    ChannelState,
    FailedPreconditionError,
    InboxItem,
    Mesh,
    Position,
    PresenceEvent,
    Publication,
)
from clients.sync import SyncMesh
from common.clustermap import read_map
from common.localmesh import LocalMesh
from common.slots import slot_for
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_pb2_grpc as pb_grpc
from tests.cluster import error_details
from tests.conftest import non_owner
from tests.notify_support import channels_on_every_node, take
from tests.test_metrics import _eventually, _series

Connect = Callable[..., Awaitable[Mesh]]
Stub = pb_grpc.NotifyServiceStub


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _owner(local: LocalMesh, name: str) -> str:
    """Address of the node leading ``name``'s slot."""
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    group = table.group_of_slot(slot_for(name))
    assert group is not None
    return table.addresses[group.primary]


@pytest.fixture
def stub_at(channel_at: Callable[[str], grpc.aio.Channel]) -> Callable[[str], Stub]:
    return lambda address: Stub(channel_at(address))


@pytest.fixture
def stub(shared_cluster: LocalMesh, stub_at: Any) -> Stub:
    """Any node: most channels are led elsewhere and forwarded."""
    return stub_at(shared_cluster.nodes[0].address)  # type: ignore[no-any-return]


async def _next(messages: AsyncIterator[pb.SubscribeResponse], kind: str,
                timeout: float = 10.0, skip: tuple[str, ...] = ("heartbeat", "confirmation")
                ) -> pb.SubscribeResponse:
    """The next message of ``kind`` (those of the ``skip`` kinds passed over; any
    other fails the test)."""
    async with asyncio.timeout(timeout):
        async for message in messages:
            if message.WhichOneof("content") == kind:
                return message
            assert message.WhichOneof("content") in skip, message
    raise AssertionError("the stream ended")


async def test_publish_numbers_offsets_and_get_channel_describes_it(stub: Stub) -> None:
    first = await stub.Publish(pb.PublishRequest(channel="rpc-news", data=b"a"))
    second = await stub.Publish(pb.PublishRequest(channel="rpc-news", data=b"b",
                                                  idempotency_id="p-2"))
    again = await stub.Publish(pb.PublishRequest(channel="rpc-news", data=b"other",
                                                 idempotency_id="p-2"))
    assert (first.offset, second.offset, first.epoch) == (1, 2, second.epoch) and first.epoch
    assert (again.offset, again.duplicate) == (2, True) and not second.duplicate
    info = await stub.GetChannel(pb.GetChannelRequest(channel="rpc-news"))
    assert (info.epoch, info.last_offset, info.earliest_offset) == (first.epoch, 2, 1)
    assert info.options.size == 100 and info.options.ttl.seconds == 600  # node defaults
    assert await stub.GetChannel(pb.GetChannelRequest(channel="rpc-none")) == \
        pb.GetChannelResponse()


async def test_replay_then_live_while_publishing_has_no_gap_and_no_duplicate(
    shared_cluster: LocalMesh, stub_at: Any
) -> None:
    channel = "rpc-live"
    publisher = stub_at(await _owner(shared_cluster, channel))
    for i in range(1, 31):
        await publisher.Publish(pb.PublishRequest(channel=channel, data=b"%d" % i))
    epoch = (await publisher.GetChannel(pb.GetChannelRequest(channel=channel))).epoch

    async def publish_more() -> None:
        for i in range(31, 131):
            await publisher.Publish(pb.PublishRequest(channel=channel, data=b"%d" % i))

    # Through a node that does not lead the channel: the stream is forwarded.
    entry = stub_at(non_owner(shared_cluster, channel)[0])
    call = entry.Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
        channel=channel, since=pb.StreamPosition(offset=10, epoch=epoch))]))
    writing = asyncio.create_task(publish_more())
    messages = call.__aiter__()
    assert (await _next(messages, "confirmation")).confirmation.subscription_id
    state = (await _next(messages, "state")).state
    assert (state.channel, state.epoch, state.offset, state.recovered) == (
        channel, epoch, 10, True)
    offsets: list[int] = []
    while len(offsets) < 120:
        publication = (await _next(messages, "publication")).publication
        assert publication.data == b"%d" % publication.offset
        offsets.append(publication.offset)
    await writing
    call.cancel()
    assert offsets == list(range(11, 131))


async def test_a_history_that_no_longer_reaches_back_says_so(stub: Stub) -> None:
    channel = "rpc-trimmed"
    small = pb.HistoryOptions(size=3)
    for _ in range(10):
        epoch = (await stub.Publish(pb.PublishRequest(channel=channel, data=b"x",
                                                      options=small))).epoch
    history = await stub.History(pb.HistoryRequest(channel=channel, limit=2))
    assert [p.offset for p in history.publications] == [8, 9]
    assert (history.epoch, history.last_offset, history.earliest_offset) == (epoch, 10, 8)
    rest = await stub.History(pb.HistoryRequest(channel=channel, after_offset=9))
    assert [p.offset for p in rest.publications] == [10]
    assert await stub.History(pb.HistoryRequest(channel="rpc-never")) == pb.HistoryResponse()
    call = stub.Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
        channel=channel, since=pb.StreamPosition(offset=2, epoch=epoch))]))
    messages = call.__aiter__()
    state = (await _next(messages, "state")).state
    assert not state.recovered and (state.offset, state.earliest_offset) == (7, 8)
    assert [(await _next(messages, "publication")).publication.offset
            for _ in range(3)] == [8, 9, 10]
    call.cancel()
    # An offset of another epoch cannot be recovered either.
    call = stub.Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
        channel=channel, since=pb.StreamPosition(offset=9, epoch="other"))]))
    state = (await _next(call.__aiter__(), "state")).state
    assert not state.recovered and state.epoch == epoch
    call.cancel()


async def test_a_subscriber_past_its_buffer_is_ended_with_the_offset_to_resume_from(
    shared_cluster: LocalMesh, stub_at: Any
) -> None:
    channel = "rpc-slow"
    owner = stub_at(await _owner(shared_cluster, channel))
    first = await owner.Publish(pb.PublishRequest(channel=channel, data=b"0"))
    call = owner.Subscribe(pb.SubscribeRequest(buffer=2, channels=[pb.ChannelSubscription(
        channel=channel, since=pb.StreamPosition(offset=1, epoch=first.epoch))]))
    messages = call.__aiter__()
    assert (await _next(messages, "state")).state.recovered
    # While it reads nothing, 60 publications of 40 kB (more than the stream's
    # flow-control window) are committed, in batches of several at once.
    await asyncio.gather(*(owner.Publish(pb.PublishRequest(channel=channel,
                                                           data=b"x" * (40 << 10)))
                           for _ in range(60)))
    received: list[int] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(10):
            async for message in messages:
                if message.HasField("publication"):
                    received.append(message.publication.offset)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reason, metadata, _ = error_details(info.value)
    assert reason == "SUBSCRIBER_TOO_SLOW"
    resume = int(metadata["offset"])
    assert metadata["channel"] == channel and metadata["epoch"] == first.epoch
    assert received == list(range(2, resume + 1))  # everything up to it, nothing more
    # Resuming from there loses nothing.
    call = owner.Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
        channel=channel, since=pb.StreamPosition(offset=resume, epoch=first.epoch))]))
    messages = call.__aiter__()
    assert (await _next(messages, "state")).state.recovered
    rest = [(await _next(messages, "publication")).publication.offset
            for _ in range(61 - resume)]
    assert rest == list(range(resume + 1, 62))
    call.cancel()


async def test_inbox_send_read_ack_and_live_delivery(stub: Stub) -> None:
    user = "rpc-user-1"
    call = stub.Subscribe(pb.SubscribeRequest(inbox=user))
    messages = call.__aiter__()
    assert (await _next(messages, "state")).state.inbox == user
    sent = [await stub.Send(pb.SendRequest(user=user, data=b"n%d" % i)) for i in range(1, 4)]
    assert [s.cursor for s in sent] == [1, 2, 3] and sent[-1].unread_count == 3
    # The inbox's first notification starts its epoch: a (recovered) state first.
    skip = ("heartbeat", "confirmation", "state")
    live = [(await _next(messages, "inbox_item", skip=skip)).inbox_item for _ in range(3)]
    assert [(i.user, i.cursor, i.data) for i in live] == [
        (user, 1, b"n1"), (user, 2, b"n2"), (user, 3, b"n3")]
    call.cancel()
    page = await stub.ReadInbox(pb.ReadInboxRequest(user=user, after_cursor=1))
    assert [i.cursor for i in page.items] == [2, 3]
    assert (page.read_cursor, page.unread_count, page.last_cursor) == (0, 3, 3)
    acked = await stub.AckInbox(pb.AckInboxRequest(user=user, cursor=2))
    assert (acked.read_cursor, acked.unread_count) == (2, 1)
    page = await stub.ReadInbox(pb.ReadInboxRequest(user=user))
    assert (page.read_cursor, page.unread_count, len(page.items)) == (2, 1, 3)
    assert await stub.ReadInbox(pb.ReadInboxRequest(user="rpc-nobody")) == \
        pb.ReadInboxResponse()


async def test_several_channels_must_be_led_by_the_node_subscribed_to(
    shared_cluster: LocalMesh, stub_at: Any
) -> None:
    here = await _owner(shared_cluster, "rpc-a")
    elsewhere = ""
    for i in range(1000):
        if await _owner(shared_cluster, f"rpc-b{i}") != here:
            elsewhere = f"rpc-b{i}"
            break
    call = stub_at(here).Subscribe(pb.SubscribeRequest(channels=[
        pb.ChannelSubscription(channel="rpc-a"), pb.ChannelSubscription(channel=elsewhere)]))
    error = await _error(_next(call.__aiter__(), "confirmation"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(error)[0] == "WRONG_OWNER"
    # Patterns over every slot: no node of three leads them all.
    call = stub_at(here).Subscribe(pb.SubscribeRequest(patterns=["rpc.*"]))
    error = await _error(_next(call.__aiter__(), "confirmation"))
    assert error_details(error)[0] == "WRONG_OWNER"


@pytest.mark.parametrize(("request_", "field"), [
    (pb.PublishRequest(channel=""), "channel"),
    (pb.PublishRequest(channel="a\x1fb"), "channel"),
    (pb.PublishRequest(channel="c", data=b"x" * (300 << 10)), "data"),
    (pb.PublishRequest(channel="c", idempotency_id="i" * 200), "idempotency_id"),
    (pb.PublishRequest(channel="c", options=pb.HistoryOptions(size=10**6)), "options.size"),
    (pb.PublishRequest(channel="c", options=pb.HistoryOptions(
        ttl=duration_pb2.Duration(seconds=-1))), "options.ttl"),
    (pb.SendRequest(user=""), "user"),
    (pb.AckInboxRequest(user="x" * 2000), "user"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: Stub, request_: Any, field: str
) -> None:
    method = {pb.PublishRequest: stub.Publish, pb.SendRequest: stub.Send,
              pb.AckInboxRequest: stub.AckInbox}[type(request_)]
    error = await _error(method(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(error)[2], error.details()


@pytest.mark.parametrize(("request_", "field"), [
    (pb.SubscribeRequest(), "channels"),
    (pb.SubscribeRequest(channels=[pb.ChannelSubscription(channel="d"),
                                   pb.ChannelSubscription(channel="d")]),
     "channels[1].channel"),
    (pb.SubscribeRequest(channels=[pb.ChannelSubscription(channel="")]),
     "channels[0].channel"),
    (pb.SubscribeRequest(patterns=["a..b"]), "patterns[0]"),
    (pb.SubscribeRequest(patterns=["a.*", "a.>.b"]), "patterns[1]"),
    (pb.SubscribeRequest(patterns=["a.*"], slots=[pb.SlotRange(start=5, end=2)]), "slots[0]"),
])
async def test_bad_subscriptions_are_invalid_argument_naming_the_field(
    stub: Stub, request_: pb.SubscribeRequest, field: str
) -> None:
    error = await _error(_next(stub.Subscribe(request_).__aiter__(), "confirmation"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(error)[2], error.details()


async def test_presence_join_list_stats_leave_and_expiry(stub: Stub) -> None:
    room = "rpc-room"
    # 2 s: room for the calls below on a loaded machine before c1 expires.
    short_ttl = duration_pb2.Duration(seconds=2)
    call = stub.Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
        channel=room, presence_events=True)]))
    events = call.__aiter__()
    await _next(events, "state")
    joined = await stub.Join(pb.JoinRequest(channel=room, client_id="c1", user="u1",
                                            info=b"phone", ttl=short_ttl))
    await stub.Join(pb.JoinRequest(channel=room, client_id="c2", user="u1"))  # 30 s
    await stub.Join(pb.JoinRequest(channel=room, client_id="c3", user="u2"))
    members = (await stub.Presence(pb.PresenceRequest(channel=room))).members
    assert [(m.client_id, m.user, m.info) for m in members] == [
        ("c1", "u1", b"phone"), ("c2", "u1", b""), ("c3", "u2", b"")]
    assert members[0].expire_time == joined.expire_time
    stats = await stub.PresenceStats(pb.PresenceStatsRequest(channel=room))
    assert (stats.num_clients, stats.num_users) == (3, 2)
    assert (await stub.Leave(pb.LeaveRequest(channel=room, client_id="c3"))).was_present
    assert not (await stub.Leave(pb.LeaveRequest(channel=room, client_id="c3"))).was_present
    # c1 sends no heartbeat: its primary expires it about 2 s after it joined.
    async with asyncio.timeout(10):
        while True:
            members = (await stub.Presence(pb.PresenceRequest(channel=room))).members
            if len(members) == 1:
                break
            await asyncio.sleep(0.05)
    assert [m.client_id for m in members] == ["c2"]
    changes = [(e.presence_event.change, e.presence_event.member.client_id,
                e.presence_event.expired)
               for e in [await _next(events, "presence_event") for _ in range(5)]]
    call.cancel()
    join, leave = pb.PRESENCE_CHANGE_JOIN, pb.PRESENCE_CHANGE_LEAVE
    assert changes == [(join, "c1", False), (join, "c2", False), (join, "c3", False),
                       (leave, "c3", False), (leave, "c1", True)]


@pytest.mark.parametrize(("request_", "field"), [
    (pb.JoinRequest(channel="r", client_id=""), "client_id"),
    (pb.JoinRequest(channel="r", client_id="c", ttl=duration_pb2.Duration(nanos=500)),
     "ttl"),
    (pb.JoinRequest(channel="r", client_id="c", info=b"i" * 5000), "info"),
    (pb.JoinRequest(channel="", client_id="c"), "channel"),
])
async def test_bad_joins_are_invalid_argument_naming_the_field(
    stub: Stub, request_: pb.JoinRequest, field: str
) -> None:
    error = await _error(stub.Join(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(error)[2], error.details()


async def test_an_ephemeral_channel_delivers_live_and_keeps_no_replicated_history(
    stub: Stub
) -> None:
    channel = "rpc-ephemeral"
    ephemeral = pb.HistoryOptions(ephemeral=True)
    first = await stub.Publish(pb.PublishRequest(channel=channel, data=b"a",
                                                 options=ephemeral))
    call = stub.Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
        channel=channel, since=pb.StreamPosition(offset=0, epoch=first.epoch))]))
    messages = call.__aiter__()
    assert (await _next(messages, "state")).state.recovered
    await stub.Publish(pb.PublishRequest(channel=channel, data=b"b"))  # stays ephemeral
    assert [(await _next(messages, "publication")).publication.data
            for _ in range(2)] == [b"a", b"b"]
    call.cancel()
    info = await stub.GetChannel(pb.GetChannelRequest(channel=channel))
    assert info.options.ephemeral and (info.epoch, info.last_offset) == (first.epoch, 2)


async def test_one_publication_reaches_subscribers_on_every_node_in_order(
    shared_cluster: LocalMesh, stub_at: Any
) -> None:
    """Fan-out: 60 subscribers spread over the three nodes (the non-owners forward
    their streams) all get every publication, in order; each publication is one
    replicated write, whatever the number of subscribers."""
    channel = "rpc-fanout"
    owner = stub_at(await _owner(shared_cluster, channel))
    first = await owner.Publish(pb.PublishRequest(channel=channel, data=b"0"))
    since = pb.StreamPosition(offset=first.offset, epoch=first.epoch)
    nodes = [stub_at(n.address) for n in shared_cluster.nodes]

    async def subscriber(i: int) -> list[int]:
        call = nodes[i % 3].Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
            channel=channel, since=since)]))
        messages = call.__aiter__()
        assert (await _next(messages, "state")).state.recovered
        offsets = [(await _next(messages, "publication", 20)).publication.offset
                   for _ in range(50)]
        call.cancel()
        return offsets

    readers = [asyncio.create_task(subscriber(i)) for i in range(60)]
    for i in range(50):
        await owner.Publish(pb.PublishRequest(channel=channel, data=b"%d" % i))
    results = await asyncio.gather(*readers)
    assert all(offsets == list(range(2, 52)) for offsets in results)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_stuck_subscribers_cost_the_node_no_memory_of_their_own(
    shared_cluster: LocalMesh, stub_at: Any
) -> None:
    """40 subscribers that never read while 9.6 MB are published: queued per
    subscriber that would be 384 MB; read from the shared history it is nothing
    but the streams' flow-control windows."""
    channel = "rpc-memory"
    address = await _owner(shared_cluster, channel)
    [node] = [n for n in shared_cluster.nodes if n.address == address]
    owner = stub_at(address)
    first = await owner.Publish(pb.PublishRequest(channel=channel, data=b"0",
                                                  options=pb.HistoryOptions(size=50)))
    since = pb.StreamPosition(offset=first.offset, epoch=first.epoch)
    stuck = []
    for _ in range(40):
        call = owner.Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
            channel=channel, since=since)]))
        messages = call.__aiter__()
        await _next(messages, "state")  # registered; it reads nothing more
        stuck.append((call, messages))
    before = _rss_bytes(node.pid)
    data = b"x" * (16 << 10)
    for _ in range(30):
        await asyncio.gather(*(owner.Publish(pb.PublishRequest(channel=channel, data=data))
                               for _ in range(20)))
    growth = _rss_bytes(node.pid) - before
    print(f"\nnode RSS grew by {growth / 2**20:.1f} MiB for 40 stuck subscribers of "
          "9.6 MiB published")
    assert growth < 64 << 20
    for call, _ in stuck:
        call.cancel()


async def test_the_owner_counts_channels_inboxes_subscriptions_and_appends(
    shared_cluster: LocalMesh, stub_at: Any
) -> None:
    channel = "rpc-metrics"
    address = await _owner(shared_cluster, channel)
    [node] = [n for n in shared_cluster.nodes if n.address == address]
    assert node.metrics
    owner = stub_at(address)
    before = (await _series(node.metrics)).get("mesh_notify_appended_total", 0)
    await owner.Publish(pb.PublishRequest(channel=channel, data=b"x"))
    await owner.Send(pb.SendRequest(user=channel, data=b"y"))  # same slot as the channel
    call = owner.Subscribe(pb.SubscribeRequest(channels=[pb.ChannelSubscription(
        channel=channel)]))
    await _next(call.__aiter__(), "state")
    await _eventually(node.metrics, lambda s: s["mesh_notify_appended_total"] >= before + 2
                      and s["mesh_notify_channels"] >= 1 and s["mesh_notify_inboxes"] >= 1
                      and s["mesh_notify_subscriptions"] >= 1)
    call.cancel()


async def test_a_forwarded_subscription_outlives_the_forwarding_fallback_deadline(
    shared_cluster: LocalMesh, stub_at: Any
) -> None:
    """A stream through a non-owner, with no deadline of the caller's, stays open
    (forwarded unary calls get 5 s; a subscription must not)."""
    channel = "rpc-long"
    entry = stub_at(non_owner(shared_cluster, channel)[0])
    call = entry.Subscribe(pb.SubscribeRequest(
        channels=[pb.ChannelSubscription(channel=channel)],
        heartbeat_interval=duration_pb2.Duration(seconds=1)))
    messages = call.__aiter__()
    await _next(messages, "state")
    started = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - started < 6:
        await _next(messages, "heartbeat", skip=())
    await stub_at(await _owner(shared_cluster, channel)).Publish(
        pb.PublishRequest(channel=channel, data=b"still here"))
    publication = await _next(messages, "publication", skip=("heartbeat", "state"))
    assert publication.publication.data == b"still here"
    call.cancel()


# -- through the client --------------------------------------------------------


async def test_a_subscription_spans_nodes_and_resumes_from_its_positions(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    names = channels_on_every_node(mesh, "cl-")
    async with mesh.notify.subscribe(names) as sub:
        assert len(sub.parts) == len(names)  # one stream per node
        for name in names:
            for i in range(3):
                await mesh.notify.publish(name, f"{name}:{i}")
        got = await take(sub, 3 * len(names))
        positions = sub.positions
    for name in names:
        mine = [p for p in got if isinstance(p, Publication) and p.channel == name]
        assert [(p.offset, p.data) for p in mine] == [
            (i + 1, f"{name}:{i}".encode()) for i in range(3)]
        assert positions[name] == Position(3, mine[0].epoch) and mine[0].epoch
    # Published while nobody listened: replayed from the history on resuming.
    for name in names:
        await mesh.notify.publish(name, "later")
    async with mesh.notify.subscribe(positions, include_states=True) as sub:
        got = await take(sub, 2 * len(names))
    states = [s for s in got if isinstance(s, ChannelState)]
    assert sorted(s.channel for s in states) == names and all(s.recovered for s in states)
    assert sorted((p.channel, p.offset) for p in got if isinstance(p, Publication)) == [
        (name, 4) for name in names]


async def test_a_lost_history_is_reported_not_skipped(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    for i in range(6):
        published = await mesh.notify.publish("cl-small", str(i), history_size=2)
    info = await mesh.notify.get_channel("cl-small")
    assert (info.last_offset, info.earliest_offset, info.history_size) == (6, 5, 2)
    history = await mesh.notify.history("cl-small")
    assert [(p.offset, p.data, p.epoch) for p in history.publications] == [
        (5, b"4", published.epoch), (6, b"5", published.epoch)]
    async with mesh.notify.subscribe({"cl-small": Position(1, published.epoch)}) as sub:
        state, *publications = await take(sub, 3)
    assert isinstance(state, ChannelState) and not state.recovered
    assert (state.offset, state.earliest_offset) == (4, 5)
    assert [p.offset for p in publications if isinstance(p, Publication)] == [5, 6]


async def test_inbox_kept_while_offline_then_delivered_read_and_acked(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    user = "cl-user-42"
    for i in range(3):
        sent = await mesh.notify.send(user, f"offline {i}", idempotency_id=f"n{i}")
    assert (sent.cursor, sent.unread_count) == (3, 3)
    assert (await mesh.notify.send(user, "again", idempotency_id="n2")).duplicate
    # A device that saw nothing yet connects: the inbox from its start, then live.
    async with mesh.notify.subscribe(inbox=user, inbox_since=Position(0, "")) as sub:
        offline = await take(sub, 3)
        await mesh.notify.send(user, "live")
        [live] = await take(sub, 1)
        assert sub.inbox_position == Position(4, sent.epoch)
    assert [(i.cursor, i.data) for i in offline if isinstance(i, InboxItem)] == [
        (1, b"offline 0"), (2, b"offline 1"), (3, b"offline 2")]
    assert isinstance(live, InboxItem) and (live.cursor, live.data) == (4, b"live")
    assert await mesh.notify.ack_inbox(user, 3) == (3, 1)
    page = await mesh.notify.read_inbox(user, after_cursor=2)
    assert [i.cursor for i in page.items] == [3, 4]
    assert (page.read_cursor, page.unread_count, page.last_cursor) == (3, 1, 4)


def test_sync_facade(shared_cluster: LocalMesh) -> None:
    with SyncMesh(etcd=shared_cluster.etcd_endpoint, cluster=shared_cluster.cluster) as sync:
        published = sync.notify.publish("cl-sync", "one")
        with sync.notify.subscribe({"cl-sync": Position(0, published.epoch)}) as sub:
            sync.notify.publish("cl-sync", "two")
            seen = []
            for item in sub:
                assert isinstance(item, Publication)
                seen.append(item.data)
                if len(seen) == 2:
                    break
            assert seen == [b"one", b"two"] and sub.positions["cl-sync"].offset == 2
        assert [p.data for p in sync.notify.history("cl-sync").publications] == [
            b"one", b"two"]
        assert sync.notify.send("cl-sync-user", "hi").unread_count == 1
        assert [i.data for i in sync.notify.read_inbox("cl-sync-user").items] == [b"hi"]
        assert sync.notify.ack_inbox("cl-sync-user", 1) == (1, 0)
        with sync.notify.join("cl-sync-room", "me", user="u", ttl=5):
            assert sync.notify.presence_stats("cl-sync-room").num_users == 1
        assert sync.notify.presence("cl-sync-room") == []


async def test_pattern_subscriptions_span_every_node_and_resume_with_new_channels(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    names = channels_on_every_node(mesh, "pt.orders.")  # one led by each node
    await mesh.notify.publish(names[0], "before")  # exists: followed from now
    async with mesh.notify.subscribe(patterns=["pt.orders.*"], include_states=True) as sub:
        assert sum(slots for *_, slots in sub.parts) == 16384 and len(sub.parts) == 3
        for name in names:
            await mesh.notify.publish(name, f"{name}:1")
        await mesh.notify.publish("pt.users.1", "not matched")
        await mesh.notify.publish("pt.orders.x.y", "not matched either")
        got = await take(sub, 2 * len(names))  # a state per channel, and its entry
        # Published after the unmatched ones: had they been sent, they would come first.
        await mesh.notify.publish(names[2], "marker")
        [marker] = await take(sub, 1)
        assert isinstance(marker, Publication) and marker.data == b"marker"
        positions = sub.positions
    publications = [(p.channel, p.offset, p.data) for p in got if isinstance(p, Publication)]
    assert sorted(publications) == sorted(
        [(names[0], 2, f"{names[0]}:1".encode())]
        + [(name, 1, f"{name}:1".encode()) for name in names[1:]])
    assert sorted(positions) == names
    # Missed while away: a publication to a known channel and a new channel.
    assert positions[names[2]].offset == 2
    await mesh.notify.publish(names[1], "missed")
    await mesh.notify.publish("pt.orders.new", "created meanwhile")
    async with mesh.notify.subscribe(positions, patterns=["pt.orders.*"],
                                     patterns_from_start=True) as sub:
        got = await take(sub, 2)
    assert sorted((p.channel, p.offset) for p in got if isinstance(p, Publication)) == sorted(
        [(names[1], 2), ("pt.orders.new", 1)])


async def test_presence_events_arrive_on_the_subscription(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    async with mesh.notify.subscribe(["cl-room"], presence_events=True) as sub:
        handle = await mesh.notify.join("cl-room", "tablet", user="ann", info="hi", ttl=10)
        assert [m.client_id for m in await mesh.notify.presence("cl-room")] == ["tablet"]
        assert await handle.leave()
        joined, left = await take(sub, 2)
    assert isinstance(joined, PresenceEvent) and isinstance(left, PresenceEvent)
    assert (joined.joined, joined.member.user, joined.member.info) == (True, "ann", b"hi")
    assert (left.joined, left.expired, left.member.client_id) == (False, False, "tablet")


async def test_meshctl_notify_publish_tail_and_presence(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)

    async def ctl(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshctl", "--etcd", shared_cluster.etcd_endpoint,
            "--cluster", shared_cluster.cluster, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        return out.decode()

    first = await mesh.notify.publish("cl-ctl", "one")
    published = json.loads(await ctl("-o", "json", "notify", "publish", "cl-ctl", "two"))
    assert published == {"offset": 2, "epoch": first.epoch, "duplicate": False}
    tail = await ctl("notify", "tail", "cl-ctl", "--since", f"0@{first.epoch}",
                     "--count", "2")
    assert tail.splitlines() == [f"cl-ctl #1@{first.epoch}: one",
                                 f"cl-ctl #2@{first.epoch}: two"]
    async with await mesh.notify.join("cl-ctl", "console", user="ops", ttl=30):
        listed = await ctl("notify", "presence", "cl-ctl")
    assert listed.splitlines()[0] == "1 client(s) in 'cl-ctl'"
    assert listed.splitlines()[1].split()[:3] == ["console", "user", "ops"]


async def test_a_subscriber_away_during_1000_publications_gets_each_once_in_order(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    names = [f"cl-away-{i}" for i in range(10)]
    for name in names:
        await mesh.notify.publish(name, "0", history_size=500)
    async with mesh.notify.subscribe(dict.fromkeys(names)) as sub:
        for name in names:
            await mesh.notify.publish(name, "1")
        await take(sub, len(names))
        positions = sub.positions  # then the subscriber goes away

    async def publish(name: str) -> None:
        for i in range(2, 102):
            await mesh.notify.publish(name, str(i))

    await asyncio.gather(*(publish(name) for name in names))
    async with mesh.notify.subscribe(positions) as sub:
        got = await take(sub, 1000)
    for name in names:
        mine = [p for p in got if isinstance(p, Publication) and p.channel == name]
        assert [(p.offset, p.data) for p in mine] == [(i + 1, str(i).encode())
                                                      for i in range(2, 102)]


async def test_fixed_addresses_forward_each_channel_and_refuse_patterns(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    """Without the map, one node forwards each channel's stream; patterns, which
    no node can forward, say they need the map."""
    mapped = await mesh_client(cluster=shared_cluster.cluster)
    names = channels_on_every_node(mapped, "cl-fixed-")
    mesh = await mesh_client(addresses=[shared_cluster.nodes[0].address], timeout=5)
    async with mesh.notify.subscribe(names) as sub:
        for name in names:
            await mesh.notify.publish(name, name)
        got = await take(sub, len(names))
    assert sorted((p.channel, p.data) for p in got if isinstance(p, Publication)) == [
        (name, name.encode()) for name in names]
    with pytest.raises(FailedPreconditionError, match="needs the cluster map"):
        await mesh.notify.subscribe(patterns=["cl.*"]).start()


async def test_pattern_subscriptions_carry_presence_events_of_new_channels(
    shared_cluster: LocalMesh, mesh_client: Connect
) -> None:
    mesh = await mesh_client(cluster=shared_cluster.cluster)
    async with mesh.notify.subscribe(patterns=["pt.rooms.*"], presence_events=True) as sub:
        handle = await mesh.notify.join("pt.rooms.a", "phone", ttl=10)
        await handle.leave()
        joined, left = await take(sub, 2)
    assert isinstance(joined, PresenceEvent) and isinstance(left, PresenceEvent)
    assert (joined.channel, joined.joined, left.joined) == ("pt.rooms.a", True, False)


async def test_pages_of_history_and_inbox_stop_at_3_mib_for_any_grpc_client(stub: Stub) -> None:
    # 20 payloads of ~256 KiB: 5 MiB, more than the 4 MiB a gRPC client (this
    # plain stub too) takes by default. A page stops at 3 MiB; the rest follows.
    data = b"d" * ((256 << 10) - 64)
    for _ in range(20):
        await stub.Publish(pb.PublishRequest(channel="rpc-big", data=data))
        await stub.Send(pb.SendRequest(user="rpc-big-user", data=data))
    history = await stub.History(pb.HistoryRequest(channel="rpc-big", limit=100))
    offsets = [p.offset for p in history.publications]
    assert 0 < len(offsets) < 20 and sum(len(p.data) for p in history.publications) <= 3 << 20
    rest = await stub.History(pb.HistoryRequest(channel="rpc-big", after_offset=offsets[-1],
                                                limit=100))
    assert offsets + [p.offset for p in rest.publications] == list(range(1, 21))
    inbox = await stub.ReadInbox(pb.ReadInboxRequest(user="rpc-big-user", limit=100))
    cursors = [item.cursor for item in inbox.items]
    assert 0 < len(cursors) < 20 and inbox.last_cursor == 20
    rest_items = await stub.ReadInbox(pb.ReadInboxRequest(
        user="rpc-big-user", after_cursor=cursors[-1], limit=100))
    assert cursors + [item.cursor for item in rest_items.items] == list(range(1, 21))
