"""The gateway: a cache GET over HTTP/JSON against gRPC and the ASGI floor, and
WebSocket delivery to many sockets.

One node (R=0) and a gateway (``python -m gateway``, a process of its own).
In the same interleaved rounds, with the same number in flight (1, then 16):

- ``gateway``: ``GET /v1/cache/{key}`` through the gateway with httpx (the
  gateway transcodes it and calls the key's owner over gRPC: one more hop);
- ``grpc``: ``mesh.cache.get`` through the typed client, straight to the node;
- ``floor``: ``GET /hello`` from a minimal Starlette app on the same uvicorn
  settings (`bench.asgi_floor`, a process of its own): what an HTTP request
  costs on this stack and this client before the gateway does anything.

Then S sockets (200; 20 in ``--quick``) each subscribe over ``/v1/ws`` to one
notification channel; N messages are published with 16 in flight, and the
row is S x N / the time until every socket has them all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from bench import aio, clusters
from clients import Mesh
from common.localmesh import Child

SPEC = clusters.Spec("gateway", nodes=1, replicas=0)
CONCURRENCY = (1, 16)
IN_FLIGHT = 16
KEY = "bench:gateway"
PAYLOAD = b"m" * 64


@dataclass(frozen=True)
class Sizes:
    seconds: float = 2.0
    rounds: int = 3
    sockets: int = 200
    messages: int = 200


QUICK = Sizes(seconds=0.3, rounds=1, sockets=20, messages=20)


async def _rate(call: Callable[[], Awaitable[Any]], in_flight: int, seconds: float) -> float:
    """Calls per second completed by ``in_flight`` loops in ``seconds``."""
    done = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> None:
        nonlocal done
        while loop.time() < end:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done / (time.perf_counter() - started)


async def _requests(gateway_url: str, floor_url: str, etcd: str,
                    sizes: Sizes) -> dict[str, dict[str, float]]:
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=30) as mesh, \
            httpx.AsyncClient(base_url=gateway_url, limits=limits, timeout=30) as http, \
            httpx.AsyncClient(base_url=floor_url, limits=limits, timeout=30) as floor:
        await mesh.cache.set(KEY, b"x" * 100)

        async def via_gateway() -> None:
            response = await http.get(f"/v1/cache/{KEY}")
            assert response.status_code == 200 and response.json()["found"]

        async def via_grpc() -> None:
            assert await mesh.cache.get(KEY) is not None

        async def hello() -> None:
            response = await floor.get("/hello")
            assert response.status_code == 200 and response.json()["hello"]

        sides = {"gateway": via_gateway, "grpc": via_grpc, "floor": hello}
        rates: dict[str, dict[str, list[float]]] = {
            side: {str(c): [] for c in CONCURRENCY} for side in sides}
        for call in sides.values():  # warm up every connection
            await _rate(call, IN_FLIGHT, min(0.5, sizes.seconds))
        for _ in range(sizes.rounds):
            for in_flight in CONCURRENCY:
                for side, call in sides.items():
                    rates[side][str(in_flight)].append(
                        await _rate(call, in_flight, sizes.seconds))
    return {side: {c: round(statistics.median(r), 1) for c, r in by.items()}
            for side, by in rates.items()}


async def _sockets(gateway_url: str, etcd: str, sizes: Sizes) -> dict[str, float]:
    channel = "bench.ws"
    url = gateway_url.replace("http://", "ws://") + "/v1/ws"
    measured = base64.b64encode(PAYLOAD).decode()
    live = [False] * sizes.sockets
    received = [0] * sizes.sockets  # measured messages only
    changed = asyncio.Event()

    async def follow(index: int, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "message" and "publication" in frame["message"]:
                live[index] = True
                if frame["message"]["publication"]["data"] == measured:
                    received[index] += 1
                    changed.set()

    async def everyone_has(count: int) -> None:
        async with asyncio.timeout(120):
            while min(received) < count:
                changed.clear()
                await changed.wait()

    async with Mesh(etcd=etcd, cluster=SPEC.name, timeout=30) as mesh, \
            contextlib.AsyncExitStack() as stack:
        await mesh.notify.publish(channel, b"created")
        sockets = [await stack.enter_async_context(connect(url, max_queue=None))
                   for _ in range(sizes.sockets)]
        for ws in sockets:
            await ws.send(json.dumps({"type": "ping"}))  # first frame: no token
            await ws.send(json.dumps({"type": "subscribe", "id": "n", "rpc": "notify.Subscribe",
                                      "request": {"channels": [{"channel": channel}]}}))
        readers = [asyncio.create_task(follow(i, ws)) for i, ws in enumerate(sockets)]
        try:
            # Every socket live before the clock starts ("from now" subscriptions).
            async with asyncio.timeout(60):
                while not all(live):
                    await mesh.notify.publish(channel, b"warmup")
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)  # the last warm-ups' stragglers
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def publish() -> None:
                async with gate:
                    await mesh.notify.publish(channel, PAYLOAD)

            started = time.perf_counter()
            await asyncio.gather(*(publish() for _ in range(sizes.messages)))
            await everyone_has(sizes.messages)
            elapsed = time.perf_counter() - started
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    return {"sockets": sizes.sockets, "messages": sizes.messages,
            "delivered_per_s": round(sizes.sockets * sizes.messages / elapsed, 1),
            "seconds": round(elapsed, 3)}


def _floor(workdir: Path, stack: contextlib.ExitStack) -> str:
    child = Child("asgi-floor", [sys.executable, "-m", "bench.asgi_floor"],
                  workdir / "asgi-floor.log")
    child.start()
    stack.callback(child.stop)
    ready = json.loads(child.wait_for_line("READY ", 30).removeprefix("READY "))
    return str(ready["url"])


def run(workdir: Path, etcd: str, sizes: Sizes) -> dict[str, Any]:
    """The request rows, then the sockets row."""
    with contextlib.ExitStack() as stack:
        local = clusters.start_one(stack, workdir, etcd, SPEC)
        gateway = local.start_gateway()
        floor_url = _floor(local.workdir, stack)
        rates = aio.run(_requests(gateway.url, floor_url, etcd, sizes))
        sockets = aio.run(_sockets(gateway.url, etcd, sizes))
    for c in CONCURRENCY:
        print(f"[gateway] {c} in flight: HTTP via gateway {rates['gateway'][str(c)]:,.0f}/s, "
              f"gRPC {rates['grpc'][str(c)]:,.0f}/s, ASGI floor {rates['floor'][str(c)]:,.0f}/s",
              file=sys.stderr, flush=True)
    print(f"[gateway] {sockets['sockets']} WebSockets: {sockets['delivered_per_s']:,.0f} "
          "messages/s delivered", file=sys.stderr, flush=True)
    return {"setup": f"1 node, R=0; the gateway and the ASGI floor in processes of their own; "
                     f"{sizes.rounds} interleaved round(s) of {sizes.seconds:g} s per side; "
                     f"clients in the benchmark's process (httpx, the typed client, websockets)",
            "requests": rates, "sockets": sockets}


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.gateway",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    with clusters.scratch_etcd("mesh-gateway-") as (tmp, etcd):
        print(json.dumps(run(tmp, etcd, QUICK if args.quick else Sizes()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
