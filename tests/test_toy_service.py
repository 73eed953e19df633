"""A service plugged in through the seam alone works end to end: the toy counter
(`tests.toy_counter`, loaded with ``--plugins``) is routed, forwarded,
replicated and failed over by the shared layers, with no line of its own for
any of that."""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest

from common.clustermap import read_map, wait_for_map
from common.slots import slot_for
from tests.cluster import error_details
from tests.toy_counter import SERVICE, CountResponse, GetRequest, IncrRequest

pytestmark = pytest.mark.timeout(120)

PLUGIN = ["--plugins", "tests.toy_counter:CounterService", "--services", "cache,counter"]


def _call(channel: grpc.aio.Channel, method: str, response: Any) -> Any:
    return channel.unary_unary(f"/{SERVICE.full_name}/{method}",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response.FromString)


async def test_a_plugged_in_counter_is_routed_replicated_and_failed_over(
        local_mesh: Any, channel_at: Any) -> None:
    local = local_mesh(3, extra=PLUGIN, lease_ttl=2, replicas=1)
    key = "visits"

    async def incr(address: str) -> int:
        reply = await _call(channel_at(address), "Incr", CountResponse)(
            IncrRequest(key=key, delta=1), timeout=5)
        return int(reply.value)

    async def get(address: str) -> int:
        reply = await _call(channel_at(address), "Get", CountResponse)(
            GetRequest(key=key), timeout=5)
        return int(reply.value)

    # Any node takes the call: the owner serves it, the others forward it.
    values = [await incr(random.choice(local.nodes).address) for _ in range(30)]
    assert values == list(range(1, 31))
    assert {await get(node.address) for node in local.nodes} == {30}

    # A caller that routes by itself is told where to go instead.
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    group = table.group_of_slot(slot_for(key))
    assert group is not None
    other = next(n for n in local.nodes if n.node_id != group.primary)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(channel_at(other.address), "Get", CountResponse)(
            GetRequest(key=key), timeout=5, metadata=(("x-mesh-route", "client"),))
    assert error_details(refused.value)[0] == "WRONG_OWNER"

    # The primary dies: its replica has every acknowledged increment.
    primary = next(n for n in local.nodes if n.node_id == group.primary)
    primary.child.kill()
    local.nodes.remove(primary)
    await wait_for_map(local.etcd_endpoint, local.cluster,
                       lambda t: getattr(t.group_of_slot(slot_for(key)), "primary", "") not in
                       ("", primary.node_id), timeout=30)
    survivor = local.nodes[0].address
    assert await get(survivor) == 30
    assert await incr(survivor) == 31
