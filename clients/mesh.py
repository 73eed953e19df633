"""The asyncio client: ``async with Mesh(etcd="127.0.0.1:2379") as mesh: ...``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import aetcd
import grpc

from clients.breaker import CIRCUIT_OPEN, CircuitBreaker
from clients.cache import CacheClient
from clients.directory import EtcdDirectory, NodeDirectory, StaticDirectory
from clients.errors import (
    DeadlineExceededError,
    MeshError,
    NoNodesError,
    UnavailableError,
    from_rpc_error,
)
from clients.events import EventsClient
from clients.lease import Lease, LostCallback
from clients.lock import LockClient
from clients.notify import NotifyClient
from clients.router import Router, Target
from clients.saga import SagaClient
from clients.scheduler import SchedulerClient
from clients.session import ENVELOPE_BYTES, Session, SessionChannel
from common.auth import bearer
from common.clustermap import MapFollower, RoutingTable
from common.etcd import EtcdAccess, client_for
from common.membership import NodeInfo
from common.tls import Tls, open_channel
from mesh.admin.v1 import admin_pb2

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

DEFAULT_TIMEOUT = 5.0

ROUTE_HEADER = "x-mesh-route"
"""Request metadata: ``client`` asks a node to refuse (WRONG_OWNER) rather than
forward a call for a slot it does not own, so that this client learns the owner."""

_ROUTED_BY_CLIENT: tuple[tuple[str, str], ...] = ((ROUTE_HEADER, "client"),)

S = TypeVar("S")

log = logging.getLogger(__name__)

RETIRE_MAX_WAIT = 30.0
"""Longest a departed node's channel is kept open for streams still on it (they
move when the map does, or their watchdog ends them); then it is closed under
them, and they resubscribe."""

def _node_silent(error: MeshError) -> bool:
    """The node gave no answer of its own: the connection failed or the deadline passed."""
    return isinstance(error, DeadlineExceededError) or (
        isinstance(error, UnavailableError) and not error.reason)

MAX_MESSAGE_BYTES = 32 << 20
"""The largest message this client sends or takes (a node's default limit too)."""

_CHANNEL_OPTIONS = [
    # A node's answer as large as its limit, with a session's envelope around it.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + ENVELOPE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect quickly to a restarted node instead of waiting out a long backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class Mesh:
    """A connection to a Mesh cluster: the cluster map, membership, one channel per node.

    Give ``etcd`` endpoints (default ``$MESH_ETCD_ENDPOINTS``, else
    ``127.0.0.1:2379``) to follow the cluster map and send each call to its
    key's owner, or ``addresses`` to talk to a fixed list of nodes (round-robin;
    they forward each call to its owner). ``timeout`` is the default deadline
    of every call; each method also takes its own ``timeout=``. With a
    ``tracer_provider`` (OpenTelemetry), every call is a client span whose
    context travels to the nodes, which join its trace if they trace too.
    ``tls`` (default: from ``MESH_TLS_CERT/KEY/CA``) turns on TLS: the CA to
    trust, and the client certificate when the nodes require one. ``token``
    (default ``$MESH_TOKEN``) is sent as ``authorization: Bearer`` on every call.
    ``coalesce`` (default on): concurrent cache gets bound for one node travel
    as one MGet, sets as one MSet, event appends as one AppendMany, lock
    acquires and releases as one AcquireBatch / ReleaseBatch, job enqueues as
    one EnqueueBatch and completions as one CompleteBatch (see ``clients.coalesce``).
    ``sessions`` (default on, unless tracing): unary calls to each node travel
    as messages of one stream, which costs less than a call each (see
    ``clients.session``); off, each is a gRPC call of its own.
    etcd itself is reached over TLS and with a user and password as the
    ``MESH_ETCD_CACERT/CERT/KEY/USER/PASSWORD_FILE`` variables say, or as an
    `EtcdAccess` given as ``etcd`` says.
    """

    max_message_bytes = MAX_MESSAGE_BYTES
    """The largest message this client's channels send or take."""

    def __init__(
        self,
        *,
        etcd: str | Sequence[str] | EtcdAccess | None = None,
        addresses: Sequence[str] | None = None,
        cluster: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tracer_provider: TracerProvider | None = None,
        tls: Tls | None = None,
        token: str | None = None,
        coalesce: bool = True,
        sessions: bool = True,
    ) -> None:
        self.timeout = timeout
        token = token if token is not None else os.environ.get("MESH_TOKEN", "")
        self._auth: tuple[tuple[str, str], ...] = (bearer(token),) if token else ()
        self.tls = tls or Tls.from_env()
        self._interceptors: list[Any] = []
        if tracer_provider is not None:
            from opentelemetry.instrumentation.grpc import aio_client_interceptors
            self._interceptors = list(
                aio_client_interceptors(tracer_provider=tracer_provider))  # type: ignore[no-untyped-call]
        self.cluster = cluster or os.environ.get("MESH_CLUSTER", "mesh")
        self._etcd: aetcd.Client | None = None
        self.follower: MapFollower | None = None
        if addresses:
            self.directory: NodeDirectory = StaticDirectory(addresses)
        else:
            access = etcd if isinstance(etcd, EtcdAccess) else EtcdAccess.from_env(etcd)
            self._etcd = client_for(access)
            self.directory = EtcdDirectory(self._etcd, self.cluster)
            self.follower = MapFollower(self._etcd, self.cluster)
            self.follower.on_change(self._map_changed)
        self._routers: dict[str, Router] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._held: dict[grpc.aio.Channel, int] = {}
        """Long-lived streams open on each channel (see ``hold``)."""
        self._released = asyncio.Event()
        """Set whenever a stream lets go of a channel."""
        self._topology_listeners: list[Callable[[], None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._stubs: dict[tuple[object, str], object] = {}
        # A traced call's span context travels in its own metadata: with a
        # tracer, every call goes as itself.
        self._use_sessions = sessions and not self._interceptors
        self._sessions: dict[grpc.aio.Channel, Session] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self.closed = False
        """Set by ``close()``: long-lived streams then end instead of resubscribing."""
        self.directory.on_change(self._nodes_changed)
        self.cache = CacheClient(self, coalesce=coalesce)
        self.locks = LockClient(self, coalesce=coalesce)
        self.events = EventsClient(self, coalesce=coalesce)
        self.scheduler = SchedulerClient(self, coalesce=coalesce)
        self.notify = NotifyClient(self)
        self.sagas = SagaClient(self)

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Read membership and the map; raises NoNodesError if etcd cannot be reached in time.

        A cluster without a map yet (no coordinator has written one) is fine:
        calls go to any node until the map appears.
        """
        try:
            await asyncio.wait_for(self._start(), self.timeout)
        except Exception as exc:
            await self._stop_following()
            why = f"etcd did not answer within {self.timeout:g} s" \
                if isinstance(exc, TimeoutError) else str(exc)
            raise NoNodesError(f"cannot read the cluster's membership and map: {why}") from exc

    async def _start(self) -> None:
        # etcd may be slow to take a connection (a busy machine, a member
        # restarting): try again until start()'s timeout rather than give up on
        # the first refused or timed-out attempt. Each step starts once.
        await _until_connected(self.directory.start)
        if self.follower is not None:
            await _until_connected(self.follower.start)

    async def _stop_following(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        if self.follower is not None:
            await self.follower.close()
        await self.directory.close()
        if self._etcd is not None:
            with contextlib.suppress(Exception):
                await self._etcd.close()

    async def close(self) -> None:
        self.closed = True
        await self._stop_following()
        channels, self._channels = self._channels, {}
        self._stubs.clear()
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await self._close_channel(channel, grace=None)
        for task in list(self._closing):
            task.cancel()  # _retire then closes its channel at once
        await asyncio.gather(*self._closing, return_exceptions=True)

    def lock(
        self, name: str, *, ttl: float = 30.0, wait: float | None = None, permits: int = 1,
        max_permits: int = 1, shared: bool = False, owner: str = "",
        on_lost: LostCallback | None = None, timeout: float | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """``async with mesh.lock("orders", ttl=10) as lease: ... lease.token ...``

        Holds the lock for the block, refreshing it in the background; see
        ``LockClient.lock``. Raises LockTimeoutError if ``wait`` runs out first.
        """
        return self.locks.lock(name, ttl=ttl, wait=wait, permits=permits,
                               max_permits=max_permits, shared=shared, owner=owner, on_lost=on_lost,
                               timeout=timeout)

    # -- used by the per-service clients -------------------------------------

    @property
    def table(self) -> RoutingTable | None:
        """The newest cluster map; None before one exists, or with fixed ``addresses``."""
        return self.follower.table if self.follower is not None else None

    @property
    def epoch(self) -> int:
        """The epoch of our map (0: no map)."""
        table = self.table
        return table.epoch if table is not None else 0

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata for every call: the bearer token, if any; and with a map we route,
        so nodes should refuse, not forward."""
        routed = _ROUTED_BY_CLIENT if self.table is not None else ()
        return (*routed, *self._auth) or None

    def nodes(self, service: str) -> list[NodeInfo]:
        """The live nodes (membership) that offer ``service``."""
        return self.directory.offering(service)

    def route(self, service: str, key: str | bytes) -> Target:
        """Where a call for ``key`` goes: the primary of its slot's group, else any node.

        Raises NoNodesError when no node at all is known.
        """
        router = self._routers.get(service)
        if router is None:
            router = self._routers[service] = self._router(service)
        return router.for_key(key)

    def route_slot(self, service: str, slot: int) -> Target:
        """Where a call for ``slot`` goes (as ``route``, for calls that name a slot)."""
        router = self._routers.get(service)
        if router is None:
            router = self._routers[service] = self._router(service)
        return router.for_slot(slot)

    def any_node(self, service: str) -> Target:
        """A node to send a call that any node can take (round-robin)."""
        router = self._routers.get(service)
        if router is None:
            router = self._routers[service] = self._router(service)
        return router.any_node()

    def _router(self, service: str) -> Router:
        table = self.table
        nodes = sorted((n.node_id, n.address) for n in self.nodes(service))
        if not nodes and table is not None:  # membership unread or empty: the map's nodes
            nodes = sorted((node_id, address) for node_id, address in table.addresses.items()
                           if table.states.get(node_id) != admin_pb2.NODE_STATE_DOWN)
        return Router(table, nodes)

    def channel(self, address: str) -> grpc.aio.Channel:
        """The one channel to ``address``, created on first use and reused after."""
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, self.tls, _CHANNEL_OPTIONS, self._interceptors)
            self._channels[address] = channel
        return channel

    def hold(self, address: str) -> Callable[[], None]:
        """Note a long-lived stream opened on ``address``'s channel; call the result
        once it ended. A departed node's channel is closed only when no stream holds
        it (or after RETIRE_MAX_WAIT), so that streams move before it goes."""
        channel = self.channel(address)
        self._held[channel] = self._held.get(channel, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._held.get(channel, 0) - 1
            if left > 0:
                self._held[channel] = left
            else:
                self._held.pop(channel, None)
                self._released.set()

        return release

    def on_topology_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (synchronously, on the loop) whenever the map or the
        membership changes, so long-lived streams can move; returns the remover."""
        self._topology_listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._topology_listeners.remove(callback)

        return remove

    def breaker(self, address: str) -> CircuitBreaker:
        """The circuit breaker of the node at ``address``."""
        breaker = self._breakers.get(address)
        if breaker is None:
            breaker = self._breakers[address] = CircuitBreaker()
        return breaker

    async def call(self, stub_class: Callable[[grpc.aio.Channel], Any], address: str,
                   method: str, request: Any, budget: float) -> Any:
        """One unary call to ``address`` within ``budget`` seconds, through its breaker.

        Raises the MeshError of the answer; UnavailableError reason CIRCUIT_OPEN
        (nothing sent) while the node's breaker is open.
        """
        breaker = self.breaker(address)
        if not breaker.allow():
            refused = UnavailableError(
                f"{address} stopped answering; calls to it are held back for a moment",
                code=grpc.StatusCode.UNAVAILABLE, reason=CIRCUIT_OPEN)
            refused.address = address
            raise refused
        try:
            response = await getattr(self.stub(stub_class, address), method)(
                request, timeout=budget, metadata=self.call_metadata())
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, address)
            if _node_silent(error):
                breaker.failure()
            else:
                breaker.success()
            raise error from None
        except BaseException:
            breaker.abandon()
            raise
        breaker.success()
        return response

    def stub(self, stub_class: Callable[[grpc.aio.Channel], S], address: str) -> S:
        """A generated stub bound to the one channel for ``address``."""
        key = (stub_class, address)
        stub = self._stubs.get(key)
        if stub is None:
            channel = self.channel(address)
            if self._use_sessions:
                session = self._sessions.get(channel)
                if session is None:
                    session = self._sessions[channel] = Session(
                        channel, address, self.call_metadata())
                stub = stub_class(SessionChannel(channel, session))
            else:
                stub = stub_class(channel)
            self._stubs[key] = stub
        return stub  # type: ignore[return-value]

    async def refresh(self, timeout: float | None = None) -> None:
        """Re-read the map and membership now, giving up quietly after ``timeout`` seconds.

        Concurrent callers share one read: a failover makes every in-flight call
        ask at once, and etcd should see one read, not hundreds.
        """
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.get_running_loop().create_task(self._reread())
        budget = self.timeout if timeout is None else timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), budget)

    async def _reread(self) -> None:
        reads = [self.directory.refresh()]
        if self.follower is not None:
            reads.append(self.follower.refresh())
        await asyncio.gather(*reads, return_exceptions=True)

    # -- keeping routes and channels current ----------------------------------

    def _map_changed(self, table: RoutingTable) -> None:
        self._routers.clear()
        self._topology_changed()
        self._retire_departed()

    def _nodes_changed(self) -> None:
        self._routers.clear()
        self._topology_changed()
        self._retire_departed()

    def _topology_changed(self) -> None:
        for callback in list(self._topology_listeners):
            try:
                callback()
            except Exception:  # one broken listener must not stop the others or the map
                log.exception("a topology listener failed")

    def _live_addresses(self) -> set[str]:
        live = {n.address for n in self.directory.nodes.values()}
        table = self.table
        if table is not None:
            live.update(address for node_id, address in table.addresses.items()
                        if table.states.get(node_id) != admin_pb2.NODE_STATE_DOWN)
        return live

    def _retire_departed(self) -> None:
        """Retire the channels of nodes that left both the map and membership."""
        live = self._live_addresses()
        for address in [a for a in self._channels if a not in live]:
            self._retire_channel(address)

    def _retire_channel(self, address: str, delay: float | None = None,
                        max_wait: float = RETIRE_MAX_WAIT) -> asyncio.Task[None] | None:
        """Stop using ``address``'s channel and close it after ``delay`` (default: the
        call timeout + 1 s) once no stream holds it, or ``max_wait`` later at most."""
        channel = self._channels.pop(address, None)
        if channel is None:
            return None
        for key in [k for k in self._stubs if k[1] == address]:
            del self._stubs[key]
        # Calls may still be on their way to it (a call object created just
        # before a close is cancelled, even with a grace period): retire the
        # channel only once every such call has passed its deadline.
        wait = self.timeout + 1.0 if delay is None else delay
        task = asyncio.get_running_loop().create_task(self._retire(channel, wait, max_wait))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def _retire(self, channel: grpc.aio.Channel, delay: float, max_wait: float) -> None:
        try:
            await asyncio.sleep(delay)
            # Streams still on it are about to move (the map changed) or to be ended
            # by their watchdog; closing it under them would only break them sooner.
            loop = asyncio.get_running_loop()
            until = loop.time() + max_wait
            while self._held.get(channel, 0) > 0 and loop.time() < until:
                self._released.clear()
                with contextlib.suppress(TimeoutError):  # not wait_for: it can lose a cancel
                    async with asyncio.timeout(until - loop.time()):
                        await self._released.wait()
        finally:
            self._held.pop(channel, None)
            await self._close_channel(channel, grace=1.0)

    async def _close_channel(self, channel: grpc.aio.Channel, grace: float | None) -> None:
        """Close ``channel``, its session first: the node answers the session's calls
        in flight (within ``grace``), then ends it."""
        session = self._sessions.pop(channel, None)
        if session is not None:
            session.close()
        await channel.close(grace=grace)


_UNREACHABLE = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError,
                TimeoutError)
"""Errors of an etcd that could not be reached (yet), as opposed to one that answered no."""


async def _until_connected(step: Callable[[], Any]) -> None:
    """Run ``step`` until it gets through to etcd (the caller bounds the time)."""
    delay = 0.1
    while True:
        try:
            await step()
            return
        except _UNREACHABLE as exc:
            log.debug("etcd not reachable yet (%s); trying again", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
