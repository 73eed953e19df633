"""The internal plane, tried as an attacker would, on real nodes with auth on.

Replication and forwarding live on each node's peer port, which only members
of the cluster reach (a credential signed with the cluster secret), and even a
member may send a replica commands only if the map names it the group's
primary. The client port serves the public services and nothing else.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import Mesh, NewEvent
from common.auth import bearer
from common.clustermap import RoutingTable, wait_settled
from common.errors import MeshStatusError, Reason
from common.localmesh import Etcd, LocalMesh, ProcessError
from common.peer import COORDINATOR, NODE, PEER_HEADER, PeerKey, PeerSigner
from common.slots import slot_for
from common.tenancy import SEPARATOR
from mesh.cache.v1 import cache_pb2, cache_pb2_grpc
from mesh.cache.v1 import cache_replication_pb2 as cpb
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.replication.v1 import replication_pb2_grpc as rpb_grpc
from nodes.forwarding import Forwarder
from nodes.planes import LOCAL_HEADER, TENANT_HEADER
from nodes.replication.manager import Redirect
from nodes.rpc import ForwardedError
from tests.cluster import TENANT, TOKEN, Writer, auth_flags, error_details, wait_converged
from tests.conftest import module_cluster
from tests.test_other_languages import grpcurl

PUBLIC = {
    "mesh.cache.v1.CacheService", "mesh.lock.v1.LockService", "mesh.events.v1.EventsService",
    "mesh.scheduler.v1.SchedulerService", "mesh.notify.v1.NotifyService",
    "mesh.saga.v1.SagaService", "mesh.session.v1.SessionService",
    "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
}


@pytest.fixture(scope="module")
def secured(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Three nodes (R = 1) with client auth on and a cluster secret, for the module."""
    yield from module_cluster(etcd, tmp_path_factory, "secured", 3, auth_flags)


def key_of(local: LocalMesh) -> PeerKey:
    assert local.secret_file is not None
    return PeerKey.from_file(local.secret_file, local.cluster)


@pytest.fixture
async def channels() -> AsyncIterator[Any]:
    opened: list[grpc.aio.Channel] = []

    def open_(address: str) -> grpc.aio.Channel:
        opened.append(grpc.aio.insecure_channel(address))
        return opened[-1]

    yield open_
    for channel in opened:
        await channel.close()


async def code_of(call: Any) -> grpc.StatusCode:
    """The status a call (unary, server or bidi stream) ends with."""
    try:
        if hasattr(call, "__aiter__"):
            if hasattr(call, "done_writing"):
                await call.done_writing()
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def replicate_status(stub: rpb_grpc.ReplicationServiceStub, batch: rpb.CommandBatch,
                           metadata: tuple[tuple[str, str], ...]
                           ) -> tuple[grpc.StatusCode, list[rpb.Ack], str]:
    """Send one batch on a Replicate stream: (status, acks, ErrorInfo reason)."""
    async def requests() -> AsyncIterator[rpb.ReplicateRequest]:
        yield rpb.ReplicateRequest(batches=[batch])

    # Requests from an iterator, not call.write(): a write racing the server's
    # refusal would fail locally as INTERNAL and hide the server's status.
    call = stub.Replicate(requests(), metadata=metadata, timeout=10)
    acks: list[rpb.Ack] = []
    try:
        async for response in call:
            acks.extend(response.acks)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), acks, error_details(exc)[0]
    return grpc.StatusCode.OK, acks, ""


def injection(table: RoutingTable, key: str, sender: str, position: rpb.GetPositionResponse,
              value: bytes, epoch_bump: int = 0) -> rpb.CommandBatch:
    """A batch that would set ``key`` (of the test tenant) to ``value`` on a replica,
    continuing exactly from the replica's position."""
    group = table.group_of_slot(slot_for(key))
    assert group is not None
    change = cpb.KeyChange(kind=cpb.CHANGE_KIND_SET, key=f"{TENANT}{SEPARATOR}{key}",
                           value=value, revision=position.applied_seq + 1)
    epoch = group.epoch + epoch_bump
    command = rpb.Command(seq=position.applied_seq + 1, slot=slot_for(key),
                          service=rpb.SERVICE_KIND_CACHE, payload=change.SerializeToString(),
                          epoch=epoch)
    return rpb.CommandBatch(group_id=group.group_id, epoch=epoch, primary_node_id=sender,
                            prev_epoch=position.applied_epoch, prev_seq=position.applied_seq,
                            commands=[command], in_sync=True, commit_seq=command.seq)


async def position_of(channels: Any, table: RoutingTable, node_id: str, group_id: int,
                      signer: PeerSigner) -> rpb.GetPositionResponse:
    stub = rpb_grpc.ReplicationServiceStub(channels(table.peer_addresses[node_id]))
    reply: rpb.GetPositionResponse = await stub.GetPosition(
        rpb.GetPositionRequest(group_id=group_id), timeout=5, metadata=signer.metadata())
    return reply


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


# -- the client port -------------------------------------------------------------------


async def test_the_client_port_serves_and_lists_only_public_services(
        secured: LocalMesh, channels: Any) -> None:
    for node in secured.nodes:
        listed = await grpcurl(node.address, "list")
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) == PUBLIC
        stub = rpb_grpc.ReplicationServiceStub(channels(node.address))
        for metadata in ((), (bearer(TOKEN),)):
            calls = [stub.GetPosition(rpb.GetPositionRequest(group_id=1), metadata=metadata,
                                      timeout=5),
                     stub.Snapshot(rpb.SnapshotRequest(group_id=1), metadata=metadata,
                                   timeout=5),
                     stub.Replicate(metadata=metadata, timeout=5)]
            for call in calls:
                assert await code_of(call) == grpc.StatusCode.UNIMPLEMENTED


async def test_clients_may_not_send_internal_headers(secured: LocalMesh, channels: Any) -> None:
    stub = cache_pb2_grpc.CacheServiceStub(channels(secured.nodes[0].address))
    credential = key_of(secured).sign(NODE, secured.nodes[1].node_id)
    for header, value in (("x-mesh-hops", "abc"), ("x-mesh-hops", "-5"),
                          ("x-mesh-hops", "0"), (PEER_HEADER, credential),
                          (TENANT_HEADER, TENANT), (LOCAL_HEADER, "1")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Get(cache_pb2.GetRequest(key="k"), timeout=5,
                           metadata=(bearer(TOKEN), (header, value)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _reason, _meta, violations = error_details(info.value)
        assert list(violations) == [f"metadata {header}"]
    # The same call without them is served.
    await stub.Get(cache_pb2.GetRequest(key="k"), timeout=5, metadata=(bearer(TOKEN),))


class _Context:
    """What the forwarder reads of the incoming call: a plain client's."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (bearer(TOKEN),)

    def time_remaining(self) -> float:
        return 5.0


class _Channels:
    """The channels a forwarder opens (a node's `Replication` does this)."""

    def __init__(self, open_: Any) -> None:
        self._open = open_

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._open(address)


async def test_an_owner_address_that_answers_as_no_member_is_unavailable(
        secured: LocalMesh, channels: Any) -> None:
    """After a SIGKILL the owner's old peer port may be taken by another process
    (here: another node's client port, which refuses the internal headers): a
    forwarded call then fails UNAVAILABLE, which callers retry, not with the
    stranger's INVALID_ARGUMENT."""
    stranger = secured.nodes[1]
    signer = PeerSigner(key_of(secured), NODE, secured.nodes[0].node_id)
    forwarder = Forwarder(_Channels(channels), signer)  # type: ignore[arg-type]
    gone = Redirect(slot=7, group_id=3, epoch=9, owner_node_id="node-gone",
                    owner_address=stranger.address, owner_peer_address=stranger.address)
    with pytest.raises(MeshStatusError) as info:
        await forwarder.unary(gone, "/mesh.cache.v1.CacheService/Get",
                              cache_pb2.GetRequest(key="k"), cache_pb2.GetResponse,
                              _Context())
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.reason == Reason.GROUP_UNAVAILABLE
    # What a member's peer port answers is passed on as it is.
    owner = Redirect(slot=7, group_id=3, epoch=9, owner_node_id=stranger.node_id,
                     owner_address=stranger.address, owner_peer_address=stranger.peer_address)
    with pytest.raises(ForwardedError) as passed:
        await forwarder.unary(owner, "/mesh.cache.v1.CacheService/Get",
                              cache_pb2.GetRequest(key=""), cache_pb2.GetResponse,
                              _Context())
    assert passed.value.error.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the peer port ---------------------------------------------------------------------


async def test_a_member_acts_for_a_tenant_only_on_the_peer_port(
        secured: LocalMesh, channels: Any) -> None:
    """A saga's primary enqueues its steps' jobs for the saga's tenant: with its peer
    credential and the tenant header, on the peer port, and nowhere else."""
    node = secured.nodes[0]
    signed = PeerSigner(key_of(secured), NODE, secured.nodes[1].node_id).metadata()
    peer = cache_pb2_grpc.CacheServiceStub(channels(node.peer_address))
    await peer.Set(cache_pb2.SetRequest(key="acted", value=b"for acme"), timeout=5,
                   metadata=(*signed, (TENANT_HEADER, TENANT)))
    # The write is in the tenant's namespace: its clients see it, another tenant's don't.
    client = cache_pb2_grpc.CacheServiceStub(channels(node.address))
    got = await client.Get(cache_pb2.GetRequest(key="acted"), timeout=5,
                           metadata=(bearer(TOKEN),))
    assert got.found and got.value == b"for acme"
    await peer.Set(cache_pb2.SetRequest(key="acted", value=b"for globex"), timeout=5,
                   metadata=(*signed, (TENANT_HEADER, "globex")))
    assert (await client.Get(cache_pb2.GetRequest(key="acted"), timeout=5,
                             metadata=(bearer(TOKEN),))).value == b"for acme"
    # Without a credential the peer port refuses it before any handler runs.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await peer.Set(cache_pb2.SetRequest(key="acted", value=b"x"), timeout=5,
                       metadata=((TENANT_HEADER, TENANT),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_peer_port_refuses_calls_without_a_valid_credential(
        secured: LocalMesh, channels: Any) -> None:
    node = secured.nodes[0]
    assert node.peer_address and node.peer_address != node.address
    key = key_of(secured)
    now = time.time()
    refused = {
        "none": (),
        "tenant token": (bearer(TOKEN),),
        "forged": ((PEER_HEADER, PeerKey(b"not-the-secret-0123456789", secured.cluster)
                    .sign(NODE, secured.nodes[1].node_id)),),
        "another cluster's": ((PEER_HEADER, PeerKey(secured.secret_file.read_bytes().strip()
                                                    if secured.secret_file else b"",
                                                    "other").sign(NODE, "node-2")),),
        "expired": ((PEER_HEADER, key.sign(NODE, secured.nodes[1].node_id, now=now - 300)),),
        "too long-lived": ((PEER_HEADER, key.sign(NODE, "node-2", lifetime=86400)),),
        "tampered": ((PEER_HEADER, key.sign(NODE, "node-2")[:-1] + "3"),),
        "garbage": ((PEER_HEADER, "v1:node:1:2:3"),),
    }
    channel = channels(node.peer_address)
    replication = rpb_grpc.ReplicationServiceStub(channel)
    cache = cache_pb2_grpc.CacheServiceStub(channel)
    for what, metadata in refused.items():
        calls = {
            "GetPosition": replication.GetPosition(rpb.GetPositionRequest(group_id=1),
                                                   metadata=metadata, timeout=5),
            "Snapshot": replication.Snapshot(rpb.SnapshotRequest(group_id=1),
                                             metadata=metadata, timeout=5),
            "Replicate": replication.Replicate(metadata=metadata, timeout=5),
            # A forwarded call, the way another node would send it, but unsigned.
            "Get (forwarded)": cache.Get(cache_pb2.GetRequest(key="k"), timeout=5,
                                         metadata=(*metadata, bearer(TOKEN))),
        }
        for name, call in calls.items():
            code = await code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, f"{name} with {what}: {code}"
    # A member's credential gets through (the refusals above are not vacuous).
    member = PeerSigner(key, COORDINATOR, "tests")
    reply = await replication.GetPosition(rpb.GetPositionRequest(group_id=1), timeout=5,
                                          metadata=member.metadata())
    assert reply.group_id == 1 or reply.group_id == 0
    series = await asyncio.to_thread(scrape, node.metrics)
    for reason in ("missing", "forged", "expired", "malformed"):
        assert f'mesh_peer_refused_total{{reason="{reason}"}}' in series


async def test_a_member_that_is_not_the_primary_can_neither_replicate_nor_copy(
        secured: LocalMesh, channels: Any) -> None:
    async with Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token=TOKEN,
                    timeout=5) as mesh:
        table = mesh.table
        assert table is not None
        primary = secured.nodes[0].node_id
        key = table.key_led_by(primary, "plane")
        await mesh.cache.set(key, b"real")
        group = table.group_of_slot(slot_for(key))
        assert group is not None and len(group.replicas) == 1
        replica = group.replicas[0]
        outsider = next(n.node_id for n in secured.nodes if n.node_id not in group.members)
        key_ = key_of(secured)
        as_outsider = PeerSigner(key_, NODE, outsider)
        as_coordinator = PeerSigner(key_, COORDINATOR, "coord-1")
        before = await position_of(channels, table, replica, group.group_id, as_coordinator)
        stub = rpb_grpc.ReplicationServiceStub(channels(table.peer_addresses[replica]))

        attempts = {
            "a member that is not the primary":
                (injection(table, key, outsider, before, b"injected"), as_outsider),
            "a member posing as the primary":
                (injection(table, key, primary, before, b"injected"), as_outsider),
            "a member claiming a newer epoch":
                (injection(table, key, outsider, before, b"injected", epoch_bump=5),
                 as_outsider),
            "a coordinator":
                (injection(table, key, "coord-1", before, b"injected"), as_coordinator),
        }
        for what, (batch, signer) in attempts.items():
            code, acks, reason = await replicate_status(stub, batch, signer.metadata())
            assert code == grpc.StatusCode.PERMISSION_DENIED, f"{what}: {code} {acks}"
            assert reason == "PEER_NOT_PERMITTED"
            assert acks == []

        after = await position_of(channels, table, replica, group.group_id, as_coordinator)
        assert (after.epoch, after.applied_epoch, after.applied_seq) == \
            (before.epoch, before.applied_epoch, before.applied_seq)
        assert await mesh.cache.get(key) == b"real"

        # Copying the group's state: only its members may.
        primary_stub = rpb_grpc.ReplicationServiceStub(channels(table.peer_addresses[primary]))
        for signer in (as_outsider, as_coordinator):
            call = primary_stub.Snapshot(
                rpb.SnapshotRequest(group_id=group.group_id, epoch=group.epoch),
                metadata=signer.metadata(), timeout=5)
            assert await code_of(call) == grpc.StatusCode.PERMISSION_DENIED

        replica_metrics = next(n.metrics for n in secured.nodes if n.node_id == replica)
        series = await asyncio.to_thread(scrape, replica_metrics)
        assert 'mesh_peer_refused_total{reason="not_primary"} 3.0' in series
        assert 'mesh_peer_refused_total{reason="not_a_node"} 1.0' in series


async def test_metrics_expose_no_key_value_or_token(secured: LocalMesh) -> None:
    key, value = "plane:secret-key-name", b"secret-value-0xC0FFEE"
    async with Mesh(etcd=secured.etcd_endpoint, cluster=secured.cluster, token=TOKEN,
                    timeout=5) as mesh:
        await mesh.cache.set(key, value)
        assert await mesh.cache.get(key) == value
    for node in secured.nodes:
        text = await asyncio.to_thread(scrape, node.metrics)
        for secret in (key, value.decode(), TOKEN, TENANT):
            assert secret not in text, f"{secret!r} in {node.node_id}'s /metrics"


# -- the attack, replayed ----------------------------------------------------------------


async def test_the_replica_injection_attack_fails_and_failover_keeps_every_write(
        local_mesh: Any, tmp_path: Path, channels: Any) -> None:
    """The reported attack: a value injected into a replica, then its primary
    SIGKILLed so that the replica takes over. Now the injection is refused on every
    port, the promoted replica serves the real value, no acknowledged write is
    lost, and the mesh goes on working with auth on: all four services, a node
    joining (rebalance)."""
    flags = auth_flags(tmp_path)
    local = local_mesh(3, extra=flags, lease_ttl=2)
    async with Mesh(etcd=local.etcd_endpoint, cluster=local.cluster, token=TOKEN,
                    timeout=15) as mesh:
        table = mesh.table
        assert table is not None
        victim = local.nodes[0]
        key = table.key_led_by(victim.node_id, "victim")
        await mesh.cache.set(key, b"real")
        group = table.group_of_slot(slot_for(key))
        assert group is not None
        replica = group.replicas[0]
        outsider = next(n.node_id for n in local.nodes if n.node_id not in group.members)
        as_outsider = PeerSigner(key_of(local), NODE, outsider)
        as_coordinator = PeerSigner(key_of(local), COORDINATOR, "tests")
        position = await position_of(channels, table, replica, group.group_id, as_coordinator)

        writer = Writer(mesh)
        writer.start()
        await asyncio.sleep(0.5)
        replica_node = next(n for n in local.nodes if n.node_id == replica)
        batch = injection(table, key, victim.node_id, position, b"injected")
        # As the report did it (no credential): the client port has no such
        # service (asked without a message: a message racing gRPC's own
        # UNIMPLEMENTED would fail on our side first), the peer port wants a
        # credential; then as a member that is not the primary.
        public = rpb_grpc.ReplicationServiceStub(channels(replica_node.address))
        assert await code_of(public.Replicate(timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
        peer = rpb_grpc.ReplicationServiceStub(channels(replica_node.peer_address))
        for metadata, expected in (((), grpc.StatusCode.UNAUTHENTICATED),
                                   (as_outsider.metadata(), grpc.StatusCode.PERMISSION_DENIED)):
            code, acks, _ = await replicate_status(peer, batch, metadata)
            assert (code, acks) == (expected, [])

        victim.child.signal(signal.SIGKILL)
        survivors = [n.node_id for n in local.nodes[1:]]
        await wait_settled(local.etcd_endpoint, local.cluster, survivors, timeout=30)
        await asyncio.sleep(0.5)
        await writer.acked_at_least(len(writer.acked) + 30)
        await writer.stop()
        assert await mesh.cache.get(key) == b"real"
        assert len(writer.acked) > 50
        assert await writer.lost() == []

        # Every service still works with auth on after the failover...
        lease = await mesh.locks.acquire("plane:lock", ttl=5)
        await lease.release()
        await mesh.events.append("plane-stream", NewEvent(type="Happened", data=b"{}"))
        assert len((await mesh.events.read("plane-stream")).events) == 1
        job = await mesh.scheduler.enqueue("plane-queue", "noop")
        claimed = await mesh.scheduler.claim("plane-queue", lease=5)
        assert [c.job_id for c in claimed] == [job]
        await mesh.scheduler.complete(claimed[0].job_id, claimed[0].lease_token)

        # ...and a node joining takes its share, replicated over the peer plane.
        fourth = await asyncio.to_thread(local.start_node, None, flags)
        table = await wait_settled(local.etcd_endpoint, local.cluster,
                                   [*survivors, fourth.node_id], timeout=60)
        assert table.primary_slots().get(fourth.node_id, 0) > 0
        assert await mesh.cache.get(key) == b"real"
        await wait_converged(table, local)


async def test_client_auth_without_a_cluster_secret_refuses_to_start(
        tmp_path: Path, etcd: Etcd) -> None:
    local = LocalMesh(workdir=tmp_path, cluster="nosecret", secure_peers=False,
                      _owns_workdir=False)
    local.etcd_endpoint = etcd.endpoint
    flags = auth_flags(tmp_path)
    node = local._launch_node("lonely", flags)
    try:
        code = await asyncio.to_thread(node.child.proc.wait, 30)  # type: ignore[union-attr]
        log = (tmp_path / "lonely.log").read_text()
        assert code == 2
        assert "--cluster-secret-file" in log and "Traceback" not in log
        with pytest.raises(ProcessError) as refused:
            await asyncio.to_thread(local.start_coordinator, flags)
        assert "--cluster-secret-file" in str(refused.value)
        assert "Traceback" not in str(refused.value)
    finally:
        local.stop()
