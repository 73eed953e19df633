"""A linearizable MGet asked of a node from before MGet's consistency, by the
typed client and by a node forwarding a share.

Such a node ignores ``MGetRequest.consistency`` and reads as it always did; it
leaves ``MGetResponse.consistency`` unspecified, which is how the caller tells.
`OldNode` stands for that version (stale values from MGet, fresh ones from Get,
which has always honoured its consistency): a grpc.aio server in this process
for the client, the other end of a forwarder for a node's `CacheService`.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from clients import Mesh
from common.clustermap import group_ranges
from common.errors import MeshStatusError
from mesh.admin.v1 import admin_pb2
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc
from nodes.cache.machine import CACHE
from nodes.cache.service import CacheService
from nodes.config import CacheLimits
from nodes.replication.group import Group, barriers
from nodes.replication.manager import Redirect
from nodes.replication.sender import ReplicaTracker
from tests.fakes import Here
from tests.unit.test_replication_group import Link, acked, replica_of

pytestmark = pytest.mark.timeout(20)

LINEARIZABLE = pb.READ_CONSISTENCY_LINEARIZABLE


class OldNode(pb_grpc.CacheServiceServicer):
    """A cache node that predates ``MGetRequest.consistency``."""

    def __init__(self) -> None:
        self.mgets: list[int] = []  # keys per MGet
        self.gets: list[tuple[str, int]] = []  # (key, consistency) per Get

    async def MGet(self, request: pb.MGetRequest, context: grpc.aio.ServicerContext
                   ) -> pb.MGetResponse:
        self.mgets.append(len(request.keys))
        return pb.MGetResponse(results=[pb.GetResponse(found=True, value=b"stale " + k.encode())
                                        for k in request.keys])

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext
                  ) -> pb.GetResponse:
        self.gets.append((request.key, request.consistency))
        return pb.GetResponse(found=True, value=b"fresh " + request.key.encode())


@pytest.fixture
async def old_node() -> AsyncIterator[tuple[OldNode, str]]:
    server = grpc.aio.server()
    node = OldNode()  # type: ignore[abstract]  # serves MGet and Get only
    pb_grpc.add_CacheServiceServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield node, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def one_node_map(address: str) -> bytes:
    """A map whose one group, every slot, is led by the node at ``address``."""
    ((start, end),) = group_ranges(1)
    cmap = admin_pb2.ClusterMap(epoch=1)
    cmap.groups.append(admin_pb2.Group(group_id=1, epoch=1, primary_node_id="n1",
                                       slot_ranges=[admin_pb2.SlotRange(start=start, end=end)]))
    cmap.nodes.append(admin_pb2.Node(node_id="n1", address=address,
                                     state=admin_pb2.NODE_STATE_ACTIVE))
    return cmap.SerializeToString()


async def test_a_linearizable_mget_that_an_old_node_ignored_is_asked_again_key_by_key(
        old_node: tuple[OldNode, str]) -> None:
    node, address = old_node
    async with Mesh(addresses=[address], timeout=5) as mesh:
        assert await mesh.cache.mget(["a", "b"], linearizable=True) == [b"fresh a", b"fresh b"]
        assert node.mgets == [2] and sorted(node.gets) == [("a", LINEARIZABLE),
                                                           ("b", LINEARIZABLE)]
        # A plain MGet asked for nothing the old node did not give.
        node.gets.clear()
        assert await mesh.cache.mget(["a"]) == [b"stale a"]
        assert node.gets == []


async def test_coalesced_linearizable_gets_never_take_an_old_nodes_plain_read(
        old_node: tuple[OldNode, str]) -> None:
    node, address = old_node
    mesh = Mesh(etcd="127.0.0.1:1", timeout=5)
    try:
        assert mesh.follower is not None
        mesh.follower.offer(one_node_map(address))
        keys = [f"k{i}" for i in range(10)]
        values = await asyncio.gather(*(mesh.cache.get(k, linearizable=True) for k in keys))
        assert values == [b"fresh " + k.encode() for k in keys]
        assert node.mgets == [10]  # one batch, whose answer was not linearizable
        assert sorted(node.gets) == sorted((k, LINEARIZABLE) for k in keys)
    finally:
        await mesh.close()


class OldOwner:
    """The forwarder of a node whose every slot is led by a node from before MGet's
    consistency: it answers as `OldNode` does."""

    def __init__(self) -> None:
        self.node = OldNode()  # type: ignore[abstract]  # serves MGet and Get only

    def resolve(self, slot: int, context: object) -> Redirect:
        return Redirect(slot=slot, group_id=1, epoch=1, owner_node_id="old",
                        owner_address="old:7000", owner_peer_address="old:7001")

    async def unary(self, target: Redirect, path: str, request: Any, response_type: type,
                    context: Any) -> Any:
        method = path.rsplit("/", 1)[1]
        answer = await getattr(self.node, method)(request, context)
        assert isinstance(answer, response_type)
        return answer


async def test_a_node_forwarding_a_linearizable_mget_to_an_old_owner_asks_it_key_by_key(
        ) -> None:
    service = CacheService(CacheLimits())
    owner = OldOwner()
    service.start_routing(owner)  # type: ignore[arg-type]
    context: Any = None  # only handed to the forwarder
    answer = await service.MGet(pb.MGetRequest(keys=["a", "b"], consistency=LINEARIZABLE),
                                context)
    assert answer.consistency == LINEARIZABLE
    assert [r.value for r in answer.results] == [b"fresh a", b"fresh b"]
    assert owner.node.mgets == [2]
    assert sorted(owner.node.gets) == [("a", LINEARIZABLE), ("b", LINEARIZABLE)]
    plain = await service.MGet(pb.MGetRequest(keys=["a"]), context)
    assert [r.value for r in plain.results] == [b"stale a"] and len(owner.node.gets) == 2


async def test_a_linearizable_mget_over_a_deposed_group_fails_leaving_no_outcome_unread(
        ) -> None:
    """The no-op already issued in a group led here is awaited by nobody once a
    later group turns out deposed: its failure must still be taken, or asyncio
    reports an exception never retrieved."""
    unread: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, context: unread.append(str(context.get("message"))))
    led = Group(1, "a", {})
    led.become_primary(1)
    led.trackers = {"b": ReplicaTracker(led, "b", Link(), in_sync=True)}  # type: ignore[arg-type]
    deposed = Group(2, "a", {})
    deposed.become_primary(1)
    deposed.trackers = {"b": ReplicaTracker(deposed, "b", Link(), in_sync=True)}  # type: ignore[arg-type]
    deposed.fence(2)  # a replica saw a newer epoch
    with pytest.raises(MeshStatusError) as info:
        await barriers([(led, 0), (deposed, 0)])
    assert info.value.reason == "NOT_COMMITTED"
    led.fail_waiters("a newer primary took over")  # its no-op never commits
    del led, info  # the traceback holds the no-op's future too
    gc.collect()
    await asyncio.sleep(0)
    assert unread == []


@pytest.mark.parametrize("read", ["Get", "MGet"])
async def test_a_linearizable_read_whose_group_leaves_as_its_barrier_commits_is_refused(
        read: str) -> None:
    """The no-op commits, and before the read's turn the map hands the group to
    another node, which takes its state along: the read must not look at the
    emptied copy (it did, and failed INTERNAL on a missing machine) but refuse
    in a way the client retries at the new primary."""
    service = CacheService(CacheLimits())
    group = Group(1, "a", {CACHE: service.machine})
    group.become_primary(1)
    tracker = replica_of(group)
    service.start_routing(Here(group))  # type: ignore[arg-type]
    context: Any = None
    request = pb.GetRequest(key="a", consistency=LINEARIZABLE) if read == "Get" \
        else pb.MGetRequest(keys=["a", "b"], consistency=LINEARIZABLE)
    call = asyncio.ensure_future(getattr(service, read)(request, context))
    await asyncio.sleep(0)  # the barrier's no-op is proposed
    assert group.log.last_seq == 1 and not call.done()
    acked(tracker, 1)  # the replica holds it...
    group.close("the map moved the group to another node")  # ...and the group is gone
    with pytest.raises(MeshStatusError) as info:
        await call
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.reason == "GROUP_UNAVAILABLE"
    assert info.value.metadata == {"group_id": "1"}
