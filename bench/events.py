"""Event store throughput: appends, batched appends, page reads and subscription
delivery on a durable 3-node cluster, against the raw gRPC echo server.

The cluster is 3 nodes, R=1, on the cluster rows' etcd. The event store always
replicates synchronously and durably: an Append is answered once the primary
and its replica both have it on disk (each node's journal fsyncs; concurrent
writes share an fsync). Every call goes straight to its stream's primary, found
in the cluster map, through the raw generated stub (``x-mesh-route: client``, so
a misrouted call fails instead of being forwarded): the client library's own
costs are not in these numbers. Events carry 100 bytes of data.

The baseline is the echo server (``bench.echo_server``: a grpc.aio server
answering CacheService/Get with a constant), started for these rows and timed
in the same interleaved rounds, at the same number of calls in flight:

- ``append.seq`` / ``append.c16``: Append of 1 event; 1 call in flight on one
  stream, or 16 in flight on 16 streams (one call per stream at a time).
- ``append.client.c16``: the same 16 appends in flight through the typed client
  (``mesh.events.append``), whose coalescing sends the appends of one loop turn
  bound for one node as one AppendMany: the one row here with the client's costs.
- ``append100.seq``: Append of 100 events, 1 in flight; rated in events/s.
- ``read100.seq`` / ``read100.c16``: Read of a 100-event page of a 1,000-event
  stream (the 10 pages in turn); rated in Read calls/s.
- ``subscribe.live``: one Subscribe to a stream, from its end, while 4 writers
  append 100-event batches to it; rated in events delivered/s (each received
  event is one operation, so it counts what arrives in the window). The
  writers append faster than one subscription delivers (about 9,000 against
  3,000 events/s on a 2-CPU VM), so this is the subscription's own rate under
  that write load (it falls further behind as the round goes on).
- ``floor.append.durable.c16``: the floor of a durable replicated append
  (``bench.floor``): raw gRPC calls (messages of one stream) relayed to one of
  two peers, both sides committing each replication message to sqlite, nothing
  of Mesh; 16 in flight.
- ``subscribe.catchup``: Subscribe to a 500-event stream from the beginning,
  read to CaughtUp, cancel, subscribe again, ...; rated in events delivered/s
  (each received event is one operation; opening subscriptions is in the time).

``python -m bench.events`` runs only these rows (its own etcd) and prints their table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench import aio, clusters, floor, report, services, standalone
from bench.progress import Progress
from bench.timing import Measurement, Op, Workload, combine, measure
from clients import Mesh, NewEvent
from common.slots import slot_for
from mesh.cache.v1 import cache_pb2, cache_pb2_grpc
from mesh.events.v1 import events_pb2 as pb
from mesh.events.v1 import events_pb2_grpc as pb_grpc

SPEC = clusters.Spec("events-r1", replicas=1, replication="sync")
DATA = b"e" * 100
TYPE = "BenchEvent"
CONCURRENCY = 16
BATCH = 100
PAGE = 100
READ_EVENTS = 1000
"""Events of the stream the Read rows page through."""
CATCHUP_EVENTS = 500
"""Events of the stream each catch-up subscription reads from the beginning."""
WRITERS, WRITER_BATCH = 4, 100
"""Appenders feeding the live subscription, and events per Append."""
READY_TIMEOUT = 20.0
"""How long setup retries an Append whose group is not serving yet."""
Metadata = tuple[tuple[str, str], ...] | None


FLOOR = f"floor.append.durable.c{CONCURRENCY}"


def workload_name(row: str) -> str:
    """``cluster.events.append.seq``; the echo rows are ``echo.events.seq``/``.c16``."""
    return f"echo.events.{row}" if row in ("seq", "c16") else f"cluster.events.{row}"


@dataclass(frozen=True)
class Row:
    """A workload, the unit of its progress line, and what runs around each of its
    rounds (the live subscription and its writers)."""

    workload: Workload
    unit: str
    around: Callable[[], AbstractAsyncContextManager[object]] = contextlib.nullcontext


class Streams:
    """Stubs bound to each stream's primary (from the cluster map), and the call
    metadata that makes nodes refuse rather than forward."""

    def __init__(self, mesh: Mesh) -> None:
        if mesh.table is None:
            raise RuntimeError(f"{SPEC.name}: the client has no cluster map")
        self.mesh, self.table = mesh, mesh.table
        self.metadata: Metadata = mesh.call_metadata()
        self.timeout = mesh.timeout

    def stub(self, stream: str) -> pb_grpc.EventsServiceStub:
        group = self.table.group_of_slot(slot_for(stream))
        if group is None or not group.primary:
            raise RuntimeError(f"{SPEC.name}: no primary for stream {stream!r}")
        return self.mesh.stub(pb_grpc.EventsServiceStub, self.table.addresses[group.primary])


def _append_request(stream: str, ids: itertools.count[int], count: int) -> pb.AppendRequest:
    """``count`` new events (ids unique in the stream: a counter)."""
    return pb.AppendRequest(stream=stream, events=[
        pb.EventData(id=str(next(ids)), type=TYPE, data=DATA) for _ in range(count)])


def _appends(s: Streams, streams: list[str], count: int) -> Op:
    """An op appending ``count`` events to a free stream from ``streams``.

    Each call takes a stream off the pool and puts it back when done, so a stream
    has one append in flight at most; the pool is a stack, so a worker keeps its own.
    """
    bound = [(stream, s.stub(stream), itertools.count(1)) for stream in streams]

    async def op() -> None:
        stream, stub, ids = bound.pop()
        try:
            await stub.Append(_append_request(stream, ids, count), timeout=s.timeout,
                              metadata=s.metadata)
        finally:
            bound.append((stream, stub, ids))
    return op


def _client_appends(s: Streams, streams: list[str]) -> Op:
    """``_appends`` of 1 event through the typed client (``mesh.events.append``),
    which sends the appends of one loop turn bound for one node as one AppendMany."""
    pool = [(stream, itertools.count(1)) for stream in streams]

    async def op() -> None:
        stream, ids = pool.pop()
        try:
            await s.mesh.events.append(stream, NewEvent(TYPE, DATA, id=f"c{next(ids)}"))
        finally:
            pool.append((stream, ids))
    return op


def _reads(s: Streams, stream: str) -> Op:
    stub = s.stub(stream)
    requests = itertools.cycle([pb.ReadRequest(stream=stream, from_version=v, max_count=PAGE)
                                for v in range(1, READ_EVENTS + 1, PAGE)])
    return lambda: stub.Read(next(requests), timeout=s.timeout, metadata=s.metadata)


class CatchUps:
    """Catch-up subscriptions to a pre-filled stream, one after the other.

    ``next_event`` (the workload's op) waits for the next event; at CaughtUp it
    checks the count, cancels the call and subscribes again from the beginning,
    so the cost of opening subscriptions is in the rate. ``running()`` cancels
    the call left open when a round ends.
    """

    def __init__(self, s: Streams, stream: str) -> None:
        self.s, self.stream = s, stream
        self.stub = s.stub(stream)
        self.request = pb.SubscribeRequest(stream=stream, start=pb.SUBSCRIBE_START_BEGINNING)
        self.call: grpc.aio.UnaryStreamCall | None = None
        self.delivered = 0

    async def next_event(self) -> None:
        while True:
            if self.call is None:
                self.call = self.stub.Subscribe(self.request, timeout=10 * self.s.timeout,
                                                metadata=self.s.metadata)
                self.delivered = 0
            message = await self.call.read()
            if message is grpc.aio.EOF:
                raise RuntimeError(f"the catch-up subscription to {self.stream!r} ended")
            kind = message.WhichOneof("content")
            if kind == "event":
                self.delivered += 1
                return
            if kind == "caught_up":
                if self.delivered != CATCHUP_EVENTS:
                    raise RuntimeError(f"catch-up of {self.stream!r} delivered "
                                       f"{self.delivered} events, not {CATCHUP_EVENTS}")
                self.call.cancel()
                self.call = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if self.call is not None:
                self.call.cancel()
                self.call = None


class LiveFeed:
    """One Subscribe to a stream, from its end, fed by ``WRITERS`` appenders.

    ``running()`` opens the subscription and starts the writers for one round;
    ``next_event`` (the workload's op) waits for the next delivered event. A
    writer that fails cancels the subscription, so the op fails instead of
    waiting forever; the subscription's deadline bounds a stalled feed.
    """

    def __init__(self, s: Streams, stream: str, deadline: float) -> None:
        self.s, self.stream, self.deadline = s, stream, deadline
        self.stub = s.stub(stream)
        self.ids = itertools.count(1)  # shared by the writers and across rounds
        self.call: grpc.aio.UnaryStreamCall | None = None
        self.writing = False
        self.failure: BaseException | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        request = pb.SubscribeRequest(stream=self.stream, start=pb.SUBSCRIBE_START_END)
        call = self.stub.Subscribe(request, timeout=self.deadline, metadata=self.s.metadata)
        try:
            # The confirmation means registered: every later append reaches it.
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("content") != "confirmation":
                raise RuntimeError(f"Subscribe to {self.stream!r} was not confirmed: {first}")
            self.call, self.writing, self.failure = call, True, None
            writers = [asyncio.create_task(self._write()) for _ in range(WRITERS)]
            try:
                yield
            finally:
                self.writing = False  # each writer finishes the append in flight
                await asyncio.gather(*writers, return_exceptions=True)
        finally:
            call.cancel()
            self.call = None
        if self.failure is not None:
            raise RuntimeError("a writer of the live subscription failed") from self.failure

    async def _write(self) -> None:
        try:
            while self.writing:
                await self.stub.Append(_append_request(self.stream, self.ids, WRITER_BATCH),
                                       timeout=self.s.timeout, metadata=self.s.metadata)
        except BaseException as exc:
            if self.writing:
                self.failure = exc
                if self.call is not None:
                    self.call.cancel()
            raise

    async def next_event(self) -> None:
        call = self.call
        if call is None:
            raise RuntimeError("the live subscription is not running")
        while True:
            try:
                message = await call.read()
            except asyncio.CancelledError:
                if self.failure is not None:  # cancelled by a failed writer
                    raise RuntimeError("a writer of the live subscription failed"
                                       ) from self.failure
                raise
            if message is grpc.aio.EOF:
                raise RuntimeError(f"the subscription to {self.stream!r} ended")
            if message.WhichOneof("content") == "event":
                return


def rows(s: Streams, echo: cache_pb2_grpc.CacheServiceStub, live: LiveFeed,
         relays: floor.Relays) -> list[Row]:
    """Every row, in run order: each echo row, then the event rows it is the baseline of."""
    echo_request = cache_pb2.GetRequest(key="bench:000")
    catch_ups = CatchUps(s, "catchup")

    def echo_get() -> Op:
        return lambda: echo.Get(echo_request, timeout=s.timeout)

    c16 = [f"append-c16-{i}" for i in range(CONCURRENCY)]
    return [
        Row(Workload(workload_name("seq"), "raw stub Get -> echo server, 1 in flight "
                     "(the event rows' baseline)", echo_get()), "calls/s"),
        Row(Workload(workload_name("append.seq"),
                     "raw stub Append of 1 event -> primary, 3 nodes R=1 durable, 1 in flight",
                     _appends(s, ["append-seq"], 1)), "appends/s"),
        Row(Workload(workload_name("append100.seq"),
                     f"raw stub Append of {BATCH} events -> primary, 3 nodes R=1 durable, "
                     "1 in flight", _appends(s, ["append-batch"], BATCH), 1, BATCH),
            "appends/s"),
        Row(Workload(workload_name("read100.seq"),
                     f"raw stub Read of a {PAGE}-event page -> primary, 1 in flight",
                     _reads(s, "read-page"), 1, PAGE), "reads/s"),
        Row(Workload(workload_name("subscribe.live"),
                     f"events delivered to one stream Subscribe while {WRITERS} writers "
                     f"append {WRITER_BATCH}-event batches", live.next_event), "events/s",
            live.running),
        Row(Workload(workload_name("subscribe.catchup"),
                     f"events delivered by Subscribes from the beginning of a "
                     f"{CATCHUP_EVENTS}-event stream to CaughtUp, one after the other",
                     catch_ups.next_event), "events/s", catch_ups.running),
        Row(Workload(workload_name("c16"), f"raw stub Get -> echo server, {CONCURRENCY} in "
                     "flight (the event rows' baseline)", echo_get(), CONCURRENCY), "calls/s"),
        Row(Workload(workload_name("append.c16"),
                     f"raw stub Append of 1 event -> primaries, 3 nodes R=1 durable, "
                     f"{CONCURRENCY} in flight on {CONCURRENCY} streams",
                     _appends(s, c16, 1), CONCURRENCY), "appends/s"),
        Row(Workload(workload_name("append.client.c16"),
                     f"mesh.events.append of 1 event (typed client: the appends of a loop "
                     f"turn for one node go as one AppendMany) -> primaries, 3 nodes R=1 "
                     f"durable, {CONCURRENCY} in flight on {CONCURRENCY} streams",
                     _client_appends(s, [f"client-{name}" for name in c16]), CONCURRENCY),
            "appends/s"),
        Row(Workload(FLOOR, f"raw gRPC calls, each relayed to one of two peers and acknowledged, "
                     f"both sides committing each replication message to sqlite (a durable "
                     f"replicated append's messages and commits, nothing of Mesh), "
                     f"{floor.SIZE} processes, {CONCURRENCY} in flight", relays.replicated(),
                     CONCURRENCY), "appends/s"),
        Row(Workload(workload_name("read100.c16"),
                     f"raw stub Read of a {PAGE}-event page -> primary, {CONCURRENCY} in flight",
                     _reads(s, "read-page"), CONCURRENCY, PAGE), "reads/s"),
    ]


async def _append_ready(s: Streams, request: pb.AppendRequest) -> None:
    """Append, retrying while the stream's group is not serving yet (safe: an Append
    is idempotent by event ids)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            await s.stub(request.stream).Append(request, timeout=s.timeout,
                                                metadata=s.metadata)
            return
        except grpc.aio.AioRpcError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{SPEC.name}: Append to {request.stream!r} still fails "
                                   f"after {READY_TIMEOUT:g} s: {exc.code().name} "
                                   f"{exc.details()}") from exc
            await asyncio.sleep(0.1)


async def prepare(s: Streams) -> None:
    """Fill the read and catch-up streams (checking they read back whole), and check
    every other stream takes an Append."""
    for stream, events in (("read-page", READ_EVENTS), ("catchup", CATCHUP_EVENTS)):
        for first in range(1, events + 1, BATCH):  # ids 1..events, in batches
            await _append_ready(s, _append_request(stream, itertools.count(first), BATCH))
    for stream in ("append-seq", "append-batch", "live",
                   *(f"append-c16-{i}" for i in range(CONCURRENCY)),
                   *(f"client-append-c16-{i}" for i in range(CONCURRENCY))):
        # Ids the workloads never use (theirs are numbers).
        await _append_ready(s, pb.AppendRequest(stream=stream, events=[
            pb.EventData(id="check", type=TYPE, data=DATA)]))
    page = await s.stub("read-page").Read(
        pb.ReadRequest(stream="read-page", from_version=READ_EVENTS - PAGE + 1, max_count=PAGE),
        timeout=s.timeout, metadata=s.metadata)
    if len(page.events) != PAGE or page.last_version != READ_EVENTS:
        raise RuntimeError(f"read-page: {len(page.events)} events read back from version "
                           f"{READ_EVENTS - PAGE + 1}, last version {page.last_version}")


async def interleaved(work: list[Row], warmup: float, window: float, rounds: int
                      ) -> list[Measurement]:
    """``bench.timing.interleaved``, with each row's ``around`` entered for its rounds."""
    progress = Progress(len(work) * rounds)
    parts: dict[str, list[Measurement]] = {r.workload.name: [] for r in work}
    for _ in range(rounds):
        for row in work:
            async with row.around():
                m = await measure(row.workload, warmup, window, progress)
            events = f", {m.keys_per_s:,.0f} events/s" if row.workload.batch > 1 else ""
            progress.finish(f"{m.ops_per_s:,.0f} {row.unit}{events}")
            parts[row.workload.name].append(m)
    return [combine(p) for p in parts.values()]


async def _measure(etcd: str, echo: str, relays: list[str], warmup: float, window: float,
                   rounds: int) -> list[Measurement]:
    async with (Mesh(etcd=etcd, cluster=SPEC.name) as mesh,
                grpc.aio.insecure_channel(echo) as channel,
                floor.connected(relays) as relay):
        s = Streams(mesh)
        await prepare(s)
        live = LiveFeed(s, "live", deadline=warmup + window + 60.0)
        return await interleaved(
            rows(s, cache_pb2_grpc.CacheServiceStub(channel), live, relay),
            warmup, window, rounds)


def run(workdir: Path, etcd: str, warmup: float, window: float, rounds: int
        ) -> list[Measurement]:
    """Start the cluster, an echo server and the floor's durable relays, time every
    row, stop them all.

    ``warmup`` and ``window`` are per workload over all ``rounds``.
    """
    with contextlib.ExitStack() as stack:
        clusters.start(stack, workdir, etcd, [SPEC])
        echo_dir = workdir / "events-echo"
        echo_dir.mkdir()
        echo = services.start_echo(stack, echo_dir, 100)
        relays = floor.start_relays(stack, workdir, "events-floor", durable=True)
        return aio.run(_measure(etcd, echo, relays, warmup / rounds, window / rounds, rounds))


def main(argv: list[str] | None = None) -> int:
    """Only the event store rows, on an etcd of their own: print their ratios."""
    return standalone.main("python -m bench.events", __doc__.splitlines()[0], run,
                           report.events_markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
