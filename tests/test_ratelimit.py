"""Rate limits on a real mesh: a global limit (buckets in a real redis-server)
holds across three nodes, per tenant, and answers with RetryInfo."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from clients import Mesh, RateLimitedError
from common.auth import bearer
from common.clustermap import read_map
from common.localmesh import Etcd, RedisServer
from mesh.cache.v1 import cache_pb2, cache_pb2_grpc

RATE = 30.0
WINDOW = 4.0


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info
    return None


async def test_a_global_limit_holds_across_three_nodes_and_spares_other_tenants(
    local_mesh: Any, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        tokens = tmp_path / "tokens"
        tokens.write_text("token-acme acme\ntoken-globex globex\n")
        local = local_mesh(3, extra=["--auth-tokens", str(tokens), "--rate-limit", str(RATE),
                                     "--rate-limit-redis", redis.url])
        table = await read_map(local.etcd_endpoint, local.cluster)
        assert table is not None
        refusals: list[grpc.aio.AioRpcError] = []
        served = {"acme": 0, "globex": 0}
        deadline = time.monotonic() + WINDOW
        first_answer: list[float] = []  # when the node first answered acme

        async def caller(node: Any, tenant: str, pause: float) -> None:
            key = table.key_led_by(node.node_id, "rl")  # served where it lands
            metadata = (bearer(f"token-{tenant}"), ("x-mesh-route", "client"))
            async with grpc.aio.insecure_channel(node.address) as channel:
                stub = cache_pb2_grpc.CacheServiceStub(channel)
                while time.monotonic() < deadline:
                    try:
                        await stub.Get(cache_pb2.GetRequest(key=key), metadata=metadata,
                                       timeout=2)
                        served[tenant] += 1
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                        assert tenant == "acme"
                        refusals.append(error)
                    if tenant == "acme" and not first_answer:
                        first_answer.append(time.monotonic())
                    await asyncio.sleep(pause)

        await asyncio.gather(*(caller(node, "acme", 0) for node in local.nodes for _ in range(2)),
                             caller(local.nodes[0], "globex", 0.1))
    finally:
        redis.stop()
    # A full bucket, then the rate, over the time acme was served: from its first
    # answer (connecting may take a while on a loaded machine) to the end.
    window = deadline - first_answer[0]
    expected = RATE + RATE * window
    print(f"\nacme: {served['acme']} calls served in {window:.1f} s through 3 nodes "
          f"(limit {RATE:g}/s, burst {RATE:g}: {expected:g} expected), "
          f"{len(refusals)} refused; globex: {served['globex']} served, none refused")
    assert abs(served["acme"] - expected) <= 0.1 * expected
    assert refusals and all(retry_info(e) is not None for e in refusals)
    # ~one call per 0.1 s (fewer if calls are slow on a loaded machine), none refused.
    assert served["globex"] >= WINDOW / 0.1 / 4


async def test_the_client_reports_a_refusal_with_its_retry_delay(
    local_mesh: Any, tmp_path: Path, etcd: Etcd, cluster_name: str
) -> None:
    local_mesh(1, extra=["--rate-limit", "1", "--rate-limit-burst", "2"])
    async with Mesh(etcd=etcd.endpoint, cluster=cluster_name, timeout=5) as mesh:
        with pytest.raises(RateLimitedError) as refused:
            for _ in range(5):
                await mesh.cache.get("rl:k")
    assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 1.0
