"""Notifications with authentication on and across failures, on real processes:
three nodes (R = 1, 2 s leases) that require tokens. Tenants never see each
other's channels or inboxes; a subscription resumes across a SIGKILL of a
channel's primary with every acknowledged publication delivered once, in order;
an inbox and presence survive it; and everything acknowledged survives every
node being SIGKILLed and restarted. (The tests run in this order: each kills
more.)"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import grpc
import jwt
import pytest
from google.protobuf import duration_pb2

from clients import ChannelState, InboxItem, Mesh, Position, Publication, UnauthenticatedError
from common.auth import bearer
from common.clustermap import wait_settled
from common.localmesh import Etcd, LocalMesh
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_pb2_grpc as pb_grpc
from tests.cluster import TOKEN, auth_flags, error_details
from tests.conftest import start_cluster
from tests.notify_support import channels_on_every_node, take

LEASE_TTL = 2


@pytest.fixture(scope="module")
def secured(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Three nodes with client authentication on, for this module."""
    local = LocalMesh(workdir=tmp_path_factory.mktemp("notifyfo"), cluster="notifyfo",
                      lease_ttl=LEASE_TTL, _owns_workdir=False)
    local.etcd_endpoint = etcd.endpoint
    try:
        start_cluster(local, 3, auth_flags(local.workdir))
        yield local
    except BaseException:
        print(f"\n===== process logs ({local.cluster}) =====\n{local.logs()}")
        raise
    finally:
        local.stop()


def _other_tenant(local: LocalMesh) -> str:
    secret = (local.workdir / "jwt-secret").read_bytes()
    return jwt.encode({"tenant": "globex", "exp": int(time.time()) + 600}, secret,
                      algorithm="HS256")


async def test_calls_need_a_token_and_tenants_never_meet(secured: LocalMesh) -> None:
    async with grpc.aio.insecure_channel(secured.nodes[0].address) as channel:
        stub = pb_grpc.NotifyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Publish(pb.PublishRequest(channel="t-news", data=b"x"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_details(info.value)[0] == "TOKEN_MISSING"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Subscribe(pb.SubscribeRequest(inbox="t-user")):
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token=TOKEN) as acme, \
            Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster,
                 token=_other_tenant(secured)) as globex, \
            Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token="forged",
                 timeout=2) as nobody:
        with pytest.raises(UnauthenticatedError):
            await nobody.notify.publish("t-news", "x")
        mine = await acme.notify.publish("t-news", "for acme")
        await acme.notify.send("t-user", "for acme's user")
        assert (await globex.notify.get_channel("t-news")).last_offset == 0
        assert (await globex.notify.read_inbox("t-user")).items == []
        async with globex.notify.subscribe({"t-news": None}, inbox="t-user") as sub:
            theirs = await globex.notify.publish("t-news", "for globex")
            await globex.notify.send("t-user", "for globex's user")
            got = await take(sub, 2)
        assert theirs.offset == 1 and theirs.epoch != mine.epoch
        assert {(type(i), i.data) for i in got if isinstance(i, Publication | InboxItem)} == {
            (Publication, b"for globex"), (InboxItem, b"for globex's user")}
        assert [i.channel for i in got if isinstance(i, Publication)] == ["t-news"]
        page = await acme.notify.read_inbox("t-user")
        assert [i.data for i in page.items] == [b"for acme's user"]
        # A pattern over every slot finds the tenant's own channels only.
        async with globex.notify.subscribe(patterns=["*"], include_states=True) as sub:
            [state] = await take(sub, 1)
            await acme.notify.publish("t-news", "acme again")
            await globex.notify.publish("t-news", "globex again")
            [publication] = await take(sub, 1)
        assert isinstance(state, ChannelState) and state.epoch == theirs.epoch
        assert isinstance(publication, Publication) and publication.data == b"globex again"


async def test_a_subscription_resumes_across_a_killed_primary_without_loss(
    secured: LocalMesh
) -> None:
    async with Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token=TOKEN,
                    timeout=15) as mesh:
        table = mesh.table
        assert table is not None
        victim = secured.nodes[0]
        names = channels_on_every_node(mesh, "fo-")
        user = table.key_led_by(victim.node_id, "fo-user")
        acked: dict[str, list[int]] = {name: [] for name in names}
        for i in range(5):
            await mesh.notify.send(user, f"before {i}")
        # Presence in a channel the victim leads: five live clients (heartbeats
        # every second) and one that joined once and died.
        room = table.key_led_by(victim.node_id, "fo-room")
        alive = [await mesh.notify.join(room, f"alive-{i}", ttl=3) for i in range(5)]
        async with grpc.aio.insecure_channel(victim.address) as channel:
            dead = await pb_grpc.NotifyServiceStub(channel).Join(
                pb.JoinRequest(channel=room, client_id="dead", ttl=duration_pb2.Duration(
                    seconds=4)), metadata=[bearer(TOKEN)])
        dead_until = dead.expire_time.ToNanoseconds() / 1e9

        sent: list[int] = []

        async def publish(stop: asyncio.Event) -> None:
            while not stop.is_set():
                for name in names:
                    acked[name].append((await mesh.notify.publish(name, "tick")).offset)
                # ... and notifications into the inbox the victim leads, mid-send.
                sent.append((await mesh.notify.send(user, f"during {len(sent)}")).cursor)
                await asyncio.sleep(0.005)

        async with mesh.notify.subscribe(names) as sub:
            stop = asyncio.Event()
            writing = asyncio.create_task(publish(stop))
            received = await take(sub, 10 * len(names))
            victim.child.signal(signal.SIGKILL)
            received += await take(sub, 40 * len(names), timeout=30)
            stop.set()
            await writing
            # Everything acknowledged is delivered (the rest of it, now).
            missing = sum(len(v) for v in acked.values()) - len(received)
            if missing > 0:
                received += await take(sub, missing)
            assert sub.resumes >= 1
        for name in names:
            offsets = [p.offset for p in received
                       if isinstance(p, Publication) and p.channel == name]
            assert offsets == list(range(1, len(offsets) + 1))  # no gap, no duplicate
            assert set(acked[name]) <= set(offsets)
        # The inbox led by the killed node is all there at its new primary: every
        # acknowledged send, once, in order.
        page = await mesh.notify.read_inbox(user, limit=1000)
        expected_data = [f"before {i}".encode() for i in range(5)] + [
            f"during {i}".encode() for i in range(len(sent))]
        assert [i.data for i in page.items] == expected_data
        assert [i.cursor for i in page.items] == list(range(1, 6 + len(sent)))
        assert sent == list(range(6, 6 + len(sent)))
        assert page.unread_count == 5 + len(sent)
        # No mass leave: the new primary renewed everyone; only the dead client
        # leaves, a ttl later, and the live ones stay all along.
        expected = {f"alive-{i}" for i in range(5)}
        members = {m.client_id: m for m in await mesh.notify.presence(room)}
        assert set(members) == expected | {"dead"}
        # Renewed at the promotion, a couple of seconds after it joined.
        assert members["dead"].expire_time > dead_until + 1
        async with asyncio.timeout(10):
            while True:
                present = {m.client_id for m in await mesh.notify.presence(room)}
                assert present >= expected, present
                if present == expected:
                    break
                await asyncio.sleep(0.2)
        for handle in alive:
            assert await handle.leave()
        assert (await mesh.notify.presence_stats(room)).num_clients == 0



async def test_every_node_killed_and_restarted_keeps_channels_inboxes_and_presence(
    secured: LocalMesh
) -> None:
    async with Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token=TOKEN,
                    timeout=15) as mesh:
        names = channels_on_every_node(mesh, "rs-")
        epochs = {}
        for name in names:
            for i in range(5):
                epochs[name] = (await mesh.notify.publish(name, f"{name}:{i}")).epoch
        for i in range(3):
            await mesh.notify.send("rs-user", f"n{i}")
        await mesh.notify.ack_inbox("rs-user", 1)
        await mesh.notify.join("rs-room", "kept", ttl=600)
    ids = [n.node_id for n in secured.nodes]
    for node in secured.nodes:
        if node.child.alive():
            node.child.kill()  # SIGKILL, reaped
    secured.nodes.clear()
    flags = auth_flags(secured.workdir)
    for node_id in ids:  # the same machines come back, with their disks
        await asyncio.to_thread(secured.start_node, node_id, flags)
    await wait_settled(secured.etcd_endpoint, secured.cluster, ids, timeout=60)

    async with Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token=TOKEN,
                    timeout=15) as mesh:
        since = {name: Position(0, epochs[name]) for name in names}
        async with mesh.notify.subscribe(since, include_states=True) as sub:
            got = await take(sub, 6 * len(names))
        for name in names:
            [state] = [s for s in got if isinstance(s, ChannelState) and s.channel == name]
            assert state.recovered and state.epoch == epochs[name]
            assert [p.data for p in got if isinstance(p, Publication) and p.channel == name] \
                == [f"{name}:{i}".encode() for i in range(5)]
        page = await mesh.notify.read_inbox("rs-user")
        assert [i.data for i in page.items] == [b"n0", b"n1", b"n2"]
        assert (page.read_cursor, page.unread_count) == (1, 2)
        assert [m.client_id for m in await mesh.notify.presence("rs-room")] == ["kept"]
