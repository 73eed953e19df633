"""``python -m gateway``: serve the HTTP/JSON gateway until SIGTERM or SIGINT.

Prints ``READY {"address": ..., "url": ..., "pid": ...}`` on stdout once it
serves (as nodes and coordinators do), so launchers can wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn
from google.protobuf import descriptor

import mesh
from clients import Mesh
from clients.errors import NoNodesError
from common.process import run_until_signalled, say
from gateway.app import Gateway, GatewayMetrics, create_app
from gateway.config import GatewayConfig, parse_args
from gateway.limits import EdgeLimiter
from gateway.openapi import Comments, document
from gateway.rules import RouteTable, routes_of
from gateway.upstream import Upstream
from mesh.cache.v1 import cache_pb2
from mesh.events.v1 import events_pb2
from mesh.lock.v1 import lock_pb2
from mesh.notify.v1 import notify_pb2
from mesh.saga.v1 import saga_pb2
from mesh.scheduler.v1 import scheduler_pb2

GRACE = 5
"""Seconds open requests (event streams included) get to finish at shutdown."""


def public_services() -> list[descriptor.ServiceDescriptor]:
    """The services whose HTTP rules the gateway serves."""
    return [cache_pb2.DESCRIPTOR.services_by_name["CacheService"],
            lock_pb2.DESCRIPTOR.services_by_name["LockService"],
            events_pb2.DESCRIPTOR.services_by_name["EventsService"],
            scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
            notify_pb2.DESCRIPTOR.services_by_name["NotifyService"],
            saga_pb2.DESCRIPTOR.services_by_name["SagaService"]]


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (`run_until_signalled` owns the
    signals), and with an event set once it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # sockets that say they are TCP, and accepted sockets take this one's protocol.
    # With it on, a keep-alive response written in two parts (headers, body) waited
    # for the client's delayed ACK: ~40 ms per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


async def serve(config: GatewayConfig, stop: asyncio.Event) -> None:
    """Run the gateway until ``stop`` is set."""
    cluster = Mesh(etcd=config.etcd, cluster=config.cluster, timeout=config.call_timeout,
                   tls=config.tls, token="")
    try:
        await cluster.start()
    except NoNodesError as exc:
        say(f"error: {exc} (check --etcd / MESH_ETCD_ENDPOINTS)", sys.stderr)
        raise SystemExit(3) from None
    limiter = EdgeLimiter(config.limits, config.cluster)
    try:
        routes = routes_of(public_services())
        comments = Comments.load(Path(mesh.__file__).parent / "descriptors.binpb")
        gateway = Gateway(RouteTable(routes), Upstream(cluster, config.call_timeout), limiter,
                          document(routes, comments), config.max_body_bytes,
                          config.sse_keepalive, GatewayMetrics(), config.websocket)
        app = create_app(gateway, config.cors_origins)
        try:
            sock = _bind(config.listen)
        except (OSError, ValueError) as exc:
            say(f"error: cannot listen on {config.listen}: {exc}", sys.stderr)
            raise SystemExit(2) from None
        server = _Server(uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off",
            proxy_headers=bool(config.forwarded_allow_ips),
            forwarded_allow_ips=config.forwarded_allow_ips or None,
            ws_max_size=config.max_body_bytes, timeout_graceful_shutdown=GRACE))
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        listening = asyncio.get_running_loop().create_task(server.listening.wait())
        await asyncio.wait({serving, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if serving.done():
            serving.result()  # uvicorn failed to start: raise its error
            return
        host, port = sock.getsockname()[:2]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        say("READY " + json.dumps({"address": address, "url": f"http://{address}",
                                   "pid": os.getpid()}))
        stopping = asyncio.get_running_loop().create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopping.cancel()
        await serving
    finally:
        await limiter.close()
        await cluster.close()


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    run_until_signalled(lambda stop: serve(config, stop), log_level=config.log_level,
                        log_format=config.log_format, loop=config.event_loop)


if __name__ == "__main__":
    main()
