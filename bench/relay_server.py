"""The transport floor of a replicated write: ``python -m bench.relay_server``.

A bare grpc.aio server speaking raw bytes with nothing of Mesh in it (no state
machine, log, auth, routing, metrics or retries), to price what the messages of
a replicated write cost Python gRPC by themselves (``bench.floor``):

- ``/floor.Relay/Echo`` (unary) answers at once: an unreplicated write's messages.
- ``/floor.Relay/Call`` (unary) relays its request's writes (``WRITE`` bytes each,
  as many as the caller coalesced) on the ``Apply`` streams this server keeps to
  its peers (``--next``, once per peer) and answers once every peer that got some
  acknowledged them: a replicated write's messages (the client's call, one
  replication message, its ack). A write's first byte picks its peer, as a
  write's group picks its replica: a Mesh node's groups have their replicas on
  every other node, so a node's concurrent writes go out on a link to each.
  Like a Mesh node's replication link, each stream keeps one message in
  flight, and the writes that arrive meanwhile go out together in the next one.
- ``/floor.Relay/Apply`` (bidi) acknowledges each message it reads.
- ``/floor.Relay/Session`` (bidi) takes both calls as messages of one stream,
  as the typed client sends its calls to a node (``clients.session``): each
  message is a kind (``C`` a Call, ``E`` an Echo), an 8-byte id and the
  request; each answer is the id, once that call is done.

With ``--durable DIR`` both sides also commit every replication message to
sqlite, as the node's journal does (WAL, ``synchronous=FULL``, in a thread,
one transaction at a time holding every message queued meanwhile): the
replica before acknowledging it, the sender while it waits for the ack. It
prints ``READY <address>`` once it serves and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

import grpc

from bench import aio
from bench.echo_server import run_until_signalled

SERVICE = "floor.Relay"
ACK = b"\x01"
WRITE = 100
"""Bytes of one write in a Call's request; its first byte picks the peer."""
T = TypeVar("T")


def raw(data: bytes) -> bytes:
    """The (de)serializer of every method: the bytes as they are."""
    return data


class Batched(Generic[T]):
    """One send in flight: items that arrive meanwhile gather, and go together in
    the next (a Mesh node's replication link, its journal's group commit, the
    typed client's coalescing all work so). A caller's future ends with the send
    that carried its item."""

    def __init__(self, send: Callable[[list[T]], Awaitable[None]]) -> None:
        self._send = send
        self._queued: list[tuple[T, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def __call__(self, item: T) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    await self._send([item for item, _ in batch])
                except Exception as exc:  # a bench fails loudly: every caller raises
                    for _, future in batch:
                        future.set_exception(exc)
                else:
                    for _, future in batch:
                        future.set_result(None)
        finally:
            self._task = None


class Disk:
    """sqlite with group commit: one transaction at a time, in a thread, holding
    every message queued meanwhile, a row each."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS messages (data BLOB NOT NULL)")
        self.commit = Batched(self._flush)

    async def _flush(self, messages: list[bytes]) -> None:
        await asyncio.to_thread(self._transaction, messages)

    def rows(self) -> int:
        """Messages committed so far."""
        return int(self._db.execute("SELECT count(*) FROM messages").fetchone()[0])

    def _transaction(self, messages: list[bytes]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO messages (data) VALUES (?)",
                             [(message,) for message in messages])
        self._db.execute("COMMIT")


class Link:
    """The one Apply stream to a peer; one message in flight, carrying
    every request queued meanwhile."""

    def __init__(self, address: str, disk: Disk | None) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._apply = self._channel.stream_stream(
            f"/{SERVICE}/Apply", request_serializer=raw, response_deserializer=raw)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._disk = disk
        self.send = Batched(self._message)
        self.messages = 0
        """Messages sent so far."""

    async def _message(self, requests: list[bytes]) -> None:
        if self._call is None or self._call.done():
            self._call = self._apply()
        message = b"".join(requests)
        self.messages += 1
        await self._call.write(message)
        if self._disk is None:
            ack = await self._call.read()
        else:
            ack, _ = await asyncio.gather(self._call.read(), self._disk.commit(message))
        if ack is grpc.aio.EOF:
            raise ConnectionError("the next server ended the Apply stream")

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        await self._channel.close()


def add_relay_service(server: grpc.aio.Server, links: list[Link], disk: Disk | None) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return ACK

    async def relay(request: bytes) -> None:
        """Each write to the peer its first byte picks; the writes for one peer
        as one item of its link."""
        if len(links) == 1:
            await links[0].send(request)
            return
        by_peer: dict[int, list[bytes]] = {}
        for at in range(0, len(request), WRITE):
            write = request[at:at + WRITE]
            by_peer.setdefault(write[0] % len(links), []).append(write)
        sends = [links[peer].send(b"".join(writes)) for peer, writes in by_peer.items()]
        if len(sends) == 1:
            await sends[0]
        else:
            await asyncio.gather(*sends)

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if not links:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "started without --next")
        await relay(request)
        return ACK

    async def apply(requests: AsyncIterator[bytes],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for message in requests:
            if disk is not None:
                await disk.commit(message)
            yield ACK

    async def session(requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        reading = True

        async def run(message: bytes) -> None:
            if message[:1] == b"C" and links:
                await relay(message[9:])
            answers.put_nowait(message[1:9])

        def ended(task: asyncio.Task[None]) -> None:
            running.discard(task)
            if not reading and not running:
                answers.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            async for message in requests:
                task = asyncio.create_task(run(message))
                running.add(task)
                task.add_done_callback(ended)
            reading = False
            if not running:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, raw, raw),
        "Call": grpc.unary_unary_rpc_method_handler(call, raw, raw),
        "Apply": grpc.stream_stream_rpc_method_handler(apply, raw, raw),
        "Session": grpc.stream_stream_rpc_method_handler(session, raw, raw),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def serve(listen: str, peers: list[str], disk: Disk | None) -> None:
    links = [Link(address, disk) for address in peers]
    server = grpc.aio.server()
    add_relay_service(server, links, disk)
    await run_until_signalled(server, listen)
    for link in links:
        await link.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--next", dest="peers", metavar="ADDRESS", action="append",
                        default=[], help="a server Call relays writes to (once per peer; "
                        "omitted: Call is refused)")
    parser.add_argument("--durable", type=Path, metavar="DIR",
                        help="commit each replication message to sqlite in DIR on both sides")
    args = parser.parse_args()
    disk = None
    if args.durable is not None:
        args.durable.mkdir(parents=True, exist_ok=True)
        disk = Disk(args.durable / "relay.db")
    aio.serve(serve(args.listen, args.peers, disk))


if __name__ == "__main__":
    main()
