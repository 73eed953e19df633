"""Prometheus metrics for nodes and coordinators: RPC counts and latency, plus gauges.

Each process serves ``/metrics`` on its own port (``--metrics-listen``) from
prometheus-client's HTTP server thread. That thread must never walk the event
loop's live structures, so state that is not a plain counter (slots led,
replication lag, leases...) is summed up on the loop into an immutable
`Snapshot`: when a scrape asks for it, at most once per ``interval``, and the
scrape reads that. Nothing is summed while nobody scrapes: at 4096 groups a
snapshot a second cost an idle node 1.5% of a core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.addresses import Endpoint

__all__ = ["Metrics", "RpcMetrics", "Snapshot", "one"]

log = logging.getLogger(__name__)

SCRAPE_WAIT = 2.0
"""Seconds a scrape waits for the loop to take a snapshot; past that (the loop is
stuck) it gets the last one, so a scrape never hangs on a busy node."""

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
"""Seconds: from a cache hit (~0.5 ms) to a long lock wait."""

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Snapshot:
    """Gauges and counters summed up on the event loop: name -> (help, {labels: value})."""

    gauges: dict[str, tuple[str, dict[Labels, float]]] = field(default_factory=dict)
    counters: dict[str, tuple[str, dict[Labels, float]]] = field(default_factory=dict)

    def merged(self, *others: Snapshot) -> Snapshot:
        """This snapshot with the series of ``others`` (disjoint names) added."""
        gauges, counters = dict(self.gauges), dict(self.counters)
        for other in others:
            gauges.update(other.gauges)
            counters.update(other.counters)
        return Snapshot(gauges, counters)


def one(value: float) -> dict[Labels, float]:
    """The values of a series without labels."""
    return {(): float(value)}


class RpcMetrics:
    """Calls served, by method and status code, and how long they took."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._count = Counter("mesh_rpc_requests", "RPCs served, by method and status code",
                              ["method", "code"], registry=registry)
        self._latency = Histogram("mesh_rpc_duration_seconds",
                                  "Time to serve an RPC, by method and status code",
                                  ["method", "code"], buckets=LATENCY_BUCKETS,
                                  registry=registry)
        # .labels() costs a lock and a dict lookup per call; keep the children.
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:
            children = self._children[method, code] = (
                self._count.labels(method, code), self._latency.labels(method, code))
        children[0].inc()
        children[1].observe(seconds)


class _SnapshotCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snapshot = self._metrics.current()
        for name, (text, values) in snapshot.gauges.items():
            yield _family(GaugeMetricFamily, name, text, values)
        for name, (text, values) in snapshot.counters.items():
            yield _family(CounterMetricFamily, name, text, values)


def _family(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, text: str,
            values: dict[Labels, float]) -> GaugeMetricFamily | CounterMetricFamily:
    names = [k for k, _ in next(iter(values))] if values else []
    family = kind(name, text, labels=names)
    for labels, value in values.items():
        family.add_metric([v for _, v in labels], value)
    return family


class Metrics:
    """One process's registry, its RPC metrics, its snapshot and its HTTP endpoint."""

    def __init__(self, take_snapshot: Callable[[], Snapshot] | None = None,
                 interval: float = 1.0) -> None:
        self.registry = CollectorRegistry()
        self.rpc = RpcMetrics(self.registry)
        self.snapshot = Snapshot()
        self.address = ""
        self._take = take_snapshot
        self._interval = interval
        self._taken_at: float | None = None  # time.monotonic() of the last snapshot
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._taking = threading.Lock()  # concurrent scrapes: one takes, the rest reuse it
        self._server: object | None = None
        self.registry.register(_SnapshotCollector(self))

    def serve(self, listen: str, advertise: str = "") -> str:
        """Serve ``/metrics`` on ``host:port`` (port 0: a free one); returns the address
        others scrape (``advertise``, see `common.addresses`). Call it on the loop
        whose state the snapshots sum up."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), host or "127.0.0.1", self.registry)
        self._server = server
        self.address = Endpoint(listen, advertise).address(server.server_port)
        return self.address

    def current(self) -> Snapshot:
        """The snapshot for a scrape (from any thread): taken on the loop now if the
        last is older than ``interval``; the last one if the loop does not take it
        within `SCRAPE_WAIT` seconds or is gone."""
        loop = self._loop
        if self._take is None or loop is None:
            return self.snapshot
        if threading.get_ident() == self._loop_thread:
            # Collected on the loop itself (a test's): take it here, and never
            # wait for the lock a scrape holds while it waits for this loop.
            if self._stale():
                self._retake()
            return self.snapshot
        with self._taking:
            if not self._stale():
                return self.snapshot
            done: concurrent.futures.Future[None] = concurrent.futures.Future()

            def take() -> None:
                if done.set_running_or_notify_cancel():
                    self._retake()
                    done.set_result(None)

            try:
                loop.call_soon_threadsafe(take)
                done.result(timeout=SCRAPE_WAIT)
            except (RuntimeError, concurrent.futures.TimeoutError):  # loop closed, or stuck
                done.cancel()
            return self.snapshot

    def _stale(self) -> bool:
        taken_at = self._taken_at
        return taken_at is None or time.monotonic() - taken_at >= self._interval

    def _retake(self) -> None:
        """On the loop: sum up a new snapshot (a failing gauge keeps the last one)."""
        assert self._take is not None
        try:
            self.snapshot = self._take()
        except Exception:  # a bug in a gauge must not stop the others
            log.exception("metrics snapshot failed")
        self._taken_at = time.monotonic()

    async def close(self) -> None:
        server = self._server
        if server is not None:
            # shutdown() waits for the serving thread: not on the event loop.
            await asyncio.to_thread(server.shutdown)  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
