"""What is measured: the clients, the data set, and the workloads in run order.

Mesh and its baseline alternate (echo then Mesh, ...) so that slow drift on the
machine does not favour one side of a ratio.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio

from bench.services import Endpoints
from bench.timing import Op, Workload
from clients import Mesh
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc

VALUE_BYTES = 100
BATCH = 100
KEYS = [f"bench:{i:03d}" for i in range(BATCH)]
VALUES = [(b"%03d" % i * VALUE_BYTES)[:VALUE_BYTES] for i in range(BATCH)]


@dataclass(frozen=True)
class Clients:
    mesh: Mesh
    echo: pb_grpc.CacheServiceStub
    redis: redis.asyncio.Redis


@contextlib.asynccontextmanager
async def connected(endpoints: Endpoints) -> AsyncIterator[Clients]:
    """The typed client (through etcd), a raw stub to the echo server, a redis client."""
    async with (
        Mesh(etcd=endpoints.etcd, cluster=endpoints.cluster) as mesh,
        grpc.aio.insecure_channel(endpoints.echo) as channel,
    ):
        client = redis.asyncio.Redis(host="127.0.0.1", port=endpoints.redis_port)
        try:
            yield Clients(mesh, pb_grpc.CacheServiceStub(channel), client)
        finally:
            await client.aclose()


async def prepare(clients: Clients) -> dict[str, Any]:
    """Write the data set to Mesh and Redis and check every client reads it back.

    Returns the Redis server's INFO (for its version).
    """
    await clients.mesh.cache.mset(list(zip(KEYS, VALUES, strict=True)))
    await clients.redis.mset(dict(zip(KEYS, VALUES, strict=True)))
    echoed = await clients.echo.Get(pb.GetRequest(key=KEYS[0]), timeout=clients.mesh.timeout)
    checks = {
        "mesh get": await clients.mesh.cache.get(KEYS[0]) == VALUES[0],
        "mesh mget": await clients.mesh.cache.mget(KEYS) == VALUES,
        "echo get": echoed.found and len(echoed.value) == VALUE_BYTES,
        "redis get": await clients.redis.get(KEYS[0]) == VALUES[0],
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise RuntimeError(f"data check failed: {', '.join(failed)}")
    info: dict[str, Any] = await clients.redis.info("server")
    return info


def workloads(clients: Clients) -> list[Workload]:
    """Every workload, in the order they run."""
    mesh, echo, client = clients.mesh, clients.echo, clients.redis
    timeout = mesh.timeout  # the raw stub gets the typed client's deadline

    def mesh_get() -> Op:
        keys = itertools.cycle(KEYS)
        return lambda: mesh.cache.get(next(keys))

    def echo_get() -> Op:
        requests = itertools.cycle([pb.GetRequest(key=k) for k in KEYS])
        return lambda: echo.Get(next(requests), timeout=timeout)

    def redis_get() -> Op:
        keys = itertools.cycle(KEYS)
        return lambda: client.get(next(keys))

    async def mesh_mget() -> None:
        await mesh.cache.mget(KEYS)

    async def redis_pipeline() -> None:
        async with client.pipeline(transaction=False) as pipe:
            for key in KEYS:
                pipe.get(key)
            await pipe.execute()

    return [
        Workload("echo.get.seq", "raw stub Get -> echo server, 1 in flight", echo_get()),
        Workload("mesh.get.seq", "mesh.cache.get -> node, 1 in flight", mesh_get()),
        Workload("echo.get.c64", "raw stub Get -> echo server, 64 in flight", echo_get(), 64),
        Workload("mesh.get.c64", "mesh.cache.get -> node, 64 in flight", mesh_get(), 64),
        Workload("redis.pipeline100.seq", "redis-py pipeline of 100 GETs, 1 in flight",
                 redis_pipeline, 1, BATCH),
        Workload("mesh.mget100.seq", "mesh.cache.mget of 100 keys, 1 in flight",
                 mesh_mget, 1, BATCH),
        Workload("redis.pipeline100.c16", "redis-py pipeline of 100 GETs, 16 in flight",
                 redis_pipeline, 16, BATCH),
        Workload("mesh.mget100.c16", "mesh.cache.mget of 100 keys, 16 in flight",
                 mesh_mget, 16, BATCH),
        Workload("redis.get.seq", "redis-py GET, 1 in flight", redis_get()),
    ]
