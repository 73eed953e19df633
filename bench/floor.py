"""Floor rows: the messages of a replicated write in raw Python gRPC, nothing of Mesh.

A Mesh write on a 3-node R=1 cluster costs at least what its messages cost: the
client's call to the primary, one replication message to the replica, its ack,
the answer. Three ``bench.relay_server`` processes, each relaying to the other
two (so every process is a primary and a replica, as every node is), send
exactly those messages with no state machine, log, auth, routing, metrics or
retries behind them. A node's groups have their replicas on every other node,
so its concurrent writes go out on a replication link to each: here too each
write names its peer, and a process's writes alternate between its two (a
loop's lock keeps to one, as a lock's group keeps its replica). The client
sends its calls to each process as messages of one stream and coalesces them
as Mesh's typed client does (a lone write goes at once; while a call to a
process is open the next writes gather for one call), and each link keeps one
message in flight, as a node's replication link does. Timed in the same
interleaved rounds as the Mesh rows they price, the floor rows say how much of
a Mesh row's cost the transport alone is, and whether a goal is within reach of
Python gRPC at all:

- ``floor.lock.seq`` / ``floor.lock.c16``: two relayed writes in sequence on one
  process per cycle (an acquire and a release, each a replicated write), from 1
  loop or 16; rated in cycles/s, against etcd's lock as the Mesh lock rows are.
- ``floor.set.replicated.c64`` against ``floor.set.unreplicated.c64``: relayed
  writes against echoed ones (a write on R=1 against R=0), 64 in flight.
- ``floor.append.durable.c16``: relayed writes on processes whose two sides commit
  every replication message to sqlite (as the event store's durable appends),
  16 in flight; against the echo server, as the event rows are.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Protocol

import grpc

from bench import services
from bench.relay_server import SERVICE, WRITE, Batched, raw
from bench.timing import Op
from common.localmesh import Child, free_ports

SIZE = 3
"""Relay processes: one per node of the clusters the floor rows price."""
PEERS = SIZE - 1
"""The peers each process relays to: every other process, as a node replicates to."""


def payload(peer: int) -> bytes:
    """A write's request for the ``peer``-th peer of its process: ``WRITE`` (100)
    bytes, as the Mesh rows' values and events; its first byte names the peer."""
    return bytes([peer]) + b"f" * (WRITE - 1)


PAYLOADS = [payload(peer) for peer in range(PEERS)]
TIMEOUT = 10.0


class Unary(Protocol):
    """A raw unary method of the relays."""

    def __call__(self, request: bytes, *, timeout: float) -> Awaitable[bytes]: ...


def start_relays(stack: contextlib.ExitStack, workdir: Path, name: str,
                 durable: bool = False) -> list[str]:
    """Start ``SIZE`` relay servers, each relaying to the other ones (stopped with
    ``stack``); their addresses. ``durable``: each commits to sqlite in ``workdir``."""
    ports = free_ports(SIZE)
    env = services.python_env()
    children = []
    for i, port in enumerate(ports):
        argv = [sys.executable, "-m", "bench.relay_server", "--listen", f"127.0.0.1:{port}"]
        for peer in range(1, SIZE):
            argv += ["--next", f"127.0.0.1:{ports[(i + peer) % SIZE]}"]
        if durable:
            argv += ["--durable", str(workdir / f"{name}-{i}")]
        child = Child(f"{name}-{i}", argv, workdir / f"{name}-{i}.log", env=env)
        stack.callback(child.stop)
        child.start()
        children.append(child)
    return [child.wait_for_line("READY ", 30.0).removeprefix("READY ").strip()
            for child in children]


def coalesced(unary: Unary) -> Batched[bytes]:
    """Writes bound for one process, sent as the typed client sends them: a lone
    write goes at once; while a call is open the next writes gather, and go
    together in one call when it returns (their payloads concatenated)."""
    async def send(payloads: list[bytes]) -> None:
        await unary(b"".join(payloads), timeout=TIMEOUT)
    return Batched(send)


class Session:
    """Calls to one process as messages of its ``Session`` stream, sent and
    matched to their answers as the typed client's session does
    (``clients.session``): an outbox the stream's request iterator drains, and
    a reader that ends each call's future by its id."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._open = channel.stream_stream(f"/{SERVICE}/Session", request_serializer=raw,
                                           response_deserializer=raw)
        self._stream: grpc.aio.StreamStreamCall | None = None
        self._pending: dict[bytes, asyncio.Future[None]] = {}
        self._ids = itertools.count()
        self._outbox: deque[bytes] = deque()
        self._queued = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    def method(self, kind: bytes) -> Unary:
        async def call(request: bytes, *, timeout: float) -> bytes:
            if self._stream is None:
                self._stream = self._open(self._requests())
                self._reader = asyncio.create_task(self._read(self._stream))
            ident = next(self._ids).to_bytes(8, "big")
            future = self._pending[ident] = asyncio.get_running_loop().create_future()
            self._outbox.append(kind + ident + request)
            self._queued.set()
            async with asyncio.timeout(timeout):
                await future
            return b""
        return call

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            while self._outbox:
                yield self._outbox.popleft()
            self._queued.clear()
            await self._queued.wait()

    async def _read(self, stream: grpc.aio.StreamStreamCall) -> None:
        try:
            async for ident in stream:
                future = self._pending.pop(ident, None)
                if future is not None and not future.done():
                    future.set_result(None)
        except grpc.aio.AioRpcError as exc:  # a bench fails loudly: every caller raises
            for future in self._pending.values():
                future.set_exception(exc)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class Relays:
    """A client of the relays: a session to each process, and coalesced writes."""

    def __init__(self, channels: list[grpc.aio.Channel]) -> None:
        self.sessions = [Session(channel) for channel in channels]
        self._calls = [session.method(b"C") for session in self.sessions]
        self._echoes = [session.method(b"E") for session in self.sessions]
        # One coalescer per process and kind, as the typed client keeps them per
        # node and method (a lock's acquires and its releases gather apart).
        self._writes = [coalesced(call) for call in self._calls]
        self._unreplicated = [coalesced(echo) for echo in self._echoes]
        self._acquires = [coalesced(call) for call in self._calls]
        self._releases = [coalesced(call) for call in self._calls]

    async def check(self) -> None:
        """One relayed call and one echo on every process (the streams open)."""
        for call, echo in zip(self._calls, self._echoes, strict=True):
            for write in PAYLOADS:
                await call(write, timeout=TIMEOUT)
            await echo(PAYLOADS[0], timeout=TIMEOUT)

    def replicated(self) -> Op:
        """A relayed write, on each process in turn."""
        return self._spread(self._writes)

    def unreplicated(self) -> Op:
        """An echoed write, on each process in turn."""
        return self._spread(self._unreplicated)

    def cycles(self, in_flight: int) -> Op:
        """Two relayed writes in sequence on one process (a lock's acquire and
        release); each of the ``in_flight`` loops keeps to its own process and
        peer, as a loop's lock keeps to its group's primary and replica."""
        slots = list(range(in_flight))

        async def op() -> None:
            slot = slots.pop()
            try:
                process, peer = slot % SIZE, slot // SIZE % PEERS
                await self._acquires[process](PAYLOADS[peer])
                await self._releases[process](PAYLOADS[peer])
            finally:
                slots.append(slot)
        return op

    def echo_cycles(self) -> Op:
        """Two echoed writes in sequence on the first process, from one loop: the
        sequential cycle without its relay (``bench.locks`` prices a hop by it)."""
        echo = self._unreplicated[0]

        async def op() -> None:
            await echo(PAYLOADS[0])
            await echo(PAYLOADS[0])
        return op

    @staticmethod
    def _spread(writes: list[Batched[bytes]]) -> Op:
        """Each write to the next process in turn, and a process's writes to its
        peers in turn."""
        turn = itertools.cycle([(write, data) for data in PAYLOADS for write in writes])

        def op() -> Awaitable[None]:
            write, data = next(turn)
            return write(data)
        return op


@contextlib.asynccontextmanager
async def connected(addresses: list[str]) -> AsyncIterator[Relays]:
    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(grpc.aio.insecure_channel(address))
                    for address in addresses]
        relays = Relays(channels)
        for session in relays.sessions:
            stack.push_async_callback(session.close)
        await relays.check()
        yield relays
