"""Notification fan-out: one channel, S subscribers, against Redis Pub/Sub.

Three nodes (R=1) and a redis-server of their own; every subscriber lives in
this process (Mesh: ``mesh.notify.subscribe`` streams through one client;
Redis: one redis-py PubSub connection each), so both sides pay the same client
cost. For S = 1, 10 and 200:

- Latency: M messages published one at a time (each waits until every
  subscriber has the one before); publish -> deliver, per (message, subscriber),
  p50 and p99.
- Throughput: N messages published with 16 in flight; delivered messages per
  second = S x N / the time until every subscriber has them all.

Mesh is measured twice: a channel with history (every publish replicated and
kept, what resuming subscribers recover from) and an ephemeral one (at most
once, history in the primary's memory only), the closer match to Redis Pub/Sub,
which keeps nothing: a subscriber that blinks loses messages there.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis.asyncio

from bench import aio, clusters
from bench.services import start_redis
from clients import Mesh, Publication

SPEC = clusters.Spec("notify", replicas=1)
IN_FLIGHT = 16
PAYLOAD = 64


@dataclass(frozen=True)
class Sizes:
    """Subscriber counts and messages per measurement."""

    subscribers: tuple[int, ...] = (1, 10, 200)
    latency_messages: int = 200
    throughput_messages: int = 2000


QUICK = Sizes(subscribers=(1, 10), latency_messages=20, throughput_messages=100)


class Inboxes:
    """What every subscriber has received: counts, and latencies of stamped messages."""

    def __init__(self, count: int) -> None:
        self.received = [0] * count
        self.base = [0] * count  # what each had when the counting started
        self.latencies: list[float] = []
        self._changed = asyncio.Event()

    def restart(self) -> None:
        """Count from here on."""
        self.base = list(self.received)
        self.latencies.clear()

    def least(self) -> int:
        return min(r - b for r, b in zip(self.received, self.base, strict=True))

    def take(self, index: int, data: bytes) -> None:
        self.received[index] += 1
        sent = data.split(b" ", 1)[0]
        if sent:
            self.latencies.append(time.perf_counter() - float(sent))
        self._changed.set()

    async def all_have(self, count: int, timeout: float = 60.0) -> None:
        """Until every subscriber has received ``count`` messages."""
        async with asyncio.timeout(timeout):
            while self.least() < count:
                self._changed.clear()
                await self._changed.wait()


def _message(stamp: bool) -> bytes:
    head = f"{time.perf_counter():.9f}".encode() if stamp else b""
    return (head + b" ").ljust(PAYLOAD, b".")


async def _measure(inboxes: Inboxes, publish: Callable[[bytes], Awaitable[Any]],
                   sizes: Sizes) -> dict[str, float]:
    """Latency (one at a time), then throughput (IN_FLIGHT at a time)."""
    # Every subscriber live before the clock starts: a subscription made an
    # instant ago may not be yet (and at most once channels drop what it missed).
    async with asyncio.timeout(60):
        while inboxes.least() < 1:
            await publish(_message(False))
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the last warmups' stragglers
    inboxes.restart()
    for i in range(sizes.latency_messages):
        await publish(_message(True))
        await inboxes.all_have(1 + i)
    latencies = sorted(inboxes.latencies)
    done = sizes.latency_messages
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with gate:
            await publish(_message(False))

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(sizes.throughput_messages)))
    await inboxes.all_have(done + sizes.throughput_messages)
    elapsed = time.perf_counter() - started
    return {
        "p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "p99_ms": round(statistics.quantiles(latencies, n=100, method="inclusive")[98] * 1e3, 3),
        "delivered_per_s": round(len(inboxes.received) * sizes.throughput_messages / elapsed, 1),
    }


async def _mesh(etcd: str, subscribers: int, channel: str, ephemeral: bool,
                sizes: Sizes) -> dict[str, float]:
    async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=30) as mesh:
        # The channel's settings first: subscribers then follow it as it will be.
        await mesh.notify.publish(channel, b" ", ephemeral=ephemeral)
        inboxes = Inboxes(subscribers)

        async def follow(index: int) -> None:
            async with mesh.notify.subscribe([channel]) as subscription:
                async for item in subscription:
                    if isinstance(item, Publication):
                        inboxes.take(index, item.data)

        readers = [asyncio.create_task(follow(i)) for i in range(subscribers)]
        try:
            return await _measure(inboxes, lambda data: mesh.notify.publish(channel, data),
                                  sizes)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def _redis(port: int, subscribers: int, channel: str, sizes: Sizes) -> dict[str, float]:
    publisher = redis.asyncio.Redis(port=port)
    clients = [redis.asyncio.Redis(port=port) for _ in range(subscribers)]
    inboxes = Inboxes(subscribers)

    async def follow(index: int, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                inboxes.take(index, message["data"])

    pubsubs = [client.pubsub() for client in clients]
    readers: list[asyncio.Task[None]] = []
    try:
        for pubsub in pubsubs:
            await pubsub.subscribe(channel)
        readers = [asyncio.create_task(follow(i, p)) for i, p in enumerate(pubsubs)]
        return await _measure(inboxes, lambda data: publisher.publish(channel, data), sizes)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for pubsub in pubsubs:
            # Untyped before redis-py 8.2, typed since: Any fits both.
            await cast(Any, pubsub).aclose()
        for client in [*clients, publisher]:
            await client.aclose()


def run(workdir: Path, etcd: str, sizes: Sizes) -> dict[str, Any]:
    """Every subscriber count, Mesh (history, ephemeral) and Redis in turn."""
    rows = []
    with contextlib.ExitStack() as stack:
        clusters.start_one(stack, workdir, etcd, SPEC)
        port = start_redis(stack, workdir / SPEC.name)
        for subscribers in sizes.subscribers:
            row: dict[str, Any] = {"subscribers": subscribers}
            row["mesh"] = aio.run(_mesh(etcd, subscribers, f"bench-{subscribers}", False, sizes))
            row["mesh_ephemeral"] = aio.run(
                _mesh(etcd, subscribers, f"bench-eph-{subscribers}", True, sizes))
            row["redis"] = aio.run(_redis(port, subscribers, f"bench-{subscribers}", sizes))
            rows.append(row)
            print(f"[notify] {subscribers} subscriber(s): delivered/s Mesh "
                  f"{row['mesh']['delivered_per_s']:,.0f}, ephemeral "
                  f"{row['mesh_ephemeral']['delivered_per_s']:,.0f}, Redis "
                  f"{row['redis']['delivered_per_s']:,.0f}; p50 ms "
                  f"{row['mesh']['p50_ms']:.2f} / {row['mesh_ephemeral']['p50_ms']:.2f} / "
                  f"{row['redis']['p50_ms']:.2f}", file=sys.stderr, flush=True)
    return {"setup": f"3 nodes, R=1; one channel; {PAYLOAD}-byte messages; latency over "
                     f"{sizes.latency_messages} messages sent one at a time, throughput over "
                     f"{sizes.throughput_messages} with {IN_FLIGHT} publishes in flight; "
                     "every subscriber in the benchmark's process",
            "rows": rows}


def main() -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.notify", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    with clusters.scratch_etcd("mesh-notify-") as (tmp, etcd):
        print(json.dumps(run(tmp, etcd, QUICK if args.quick else Sizes()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
