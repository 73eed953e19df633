"""Connecting to etcd with aetcd, with a deadline on every call.

etcd holds the cluster map, so whoever can write to it controls the mesh: in
production it is reached over TLS and with a user and password (`EtcdAccess`).
aetcd only opens plaintext channels and authenticates once, when it connects;
`EtcdClient` opens the TLS channel itself and sends the auth token with every
call, the watch streams included, authenticating again when etcd no longer
takes it.

etcd runs as a cluster of members, and any member may die or be cut off while a
quorum goes on: `EtcdClient` takes all their endpoints and moves to another
member when the one it uses fails, fast enough for leases of a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aetcd
import aetcd.exceptions
import aetcd.utils
import aetcd.watcher
import grpc
from aetcd import rpc

from common.tasks import cancel

log = logging.getLogger(__name__)

# Every etcd call made through a client from here is bounded by this many seconds.
CALL_TIMEOUT = 3


# Reconnect fast once etcd is back: gRPC's default backoff grows to minutes, and
# a node that reconnects later than its lease TTL after an etcd restart loses
# its lease (and its groups fail over) for nothing. gRPC reads the *minimum*
# backoff as the time one connection attempt may take (TCP, TLS and the HTTP/2
# SETTINGS exchange): 2 s is plenty for a loaded host or a distant member, and
# still starts a new attempt soon after a cut heals. (At 100 ms, an attempt to
# a busy etcd failed with "timed out before receiving SETTINGS frame".)
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 2_000,
    "grpc.max_reconnect_backoff_ms": 500,
}


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (or ``http://host:port``, ``https://host:port``) -> ``(host, port)``."""
    endpoint = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


def parse_endpoints(raw: str | Sequence[str]) -> tuple[str, ...]:
    """``"a:1, b:2"`` or ``["a:1", "b:2"]`` -> ``("a:1", "b:2")``."""
    items = raw.split(",") if isinstance(raw, str) else raw
    return tuple(e.strip() for e in items if e.strip())


def read_password(path: str) -> str:
    """The password in ``path``: its first line (a trailing newline is not part of it)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--etcd-password-file {path}: {exc.strerror or exc}") from exc
    if not lines or not lines[0]:
        raise ValueError(f"--etcd-password-file {path}: empty")
    return lines[0]


class EtcdAccessError(aetcd.exceptions.ClientError):  # type: ignore[misc]  # aetcd is untyped
    """etcd turned us away for a reason retrying cannot fix: wrong credentials, missing
    permissions, TLS settings that do not match the server. The message is one line
    naming what to change."""


@dataclass(frozen=True)
class EtcdAccess:
    """Where etcd is, and how this process proves itself to it.

    With ``cacert``, ``cert`` or an ``https://`` endpoint the channel is TLS (with
    no ``cacert``: the system's CAs); with ``user`` every call carries an auth
    token got with ``password``.
    """

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    cacert: str = ""
    """PEM CA that signs etcd's server certificate."""
    cert: str = ""
    """PEM client certificate, for an etcd run with --client-cert-auth."""
    key: str = ""
    """PEM private key of ``cert``."""
    user: str = ""
    password: str = field(default="", repr=False)
    """Read from a file (never a flag: command lines are visible to every local user);
    left out of repr so that it cannot end up in a log."""

    @classmethod
    def of(cls, endpoints: str | Sequence[str], *, cacert: str = "", cert: str = "",
           key: str = "", user: str = "", password_file: str = "") -> EtcdAccess:
        """From flag values (empty: not given); ValueError names the flag at fault."""
        parsed = parse_endpoints(endpoints)
        if not parsed:
            raise ValueError("--etcd: no endpoint given")
        if bool(cert) != bool(key):
            raise ValueError("--etcd-cert and --etcd-key go together")
        for flag, path in (("--etcd-cacert", cacert), ("--etcd-cert", cert), ("--etcd-key", key)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if bool(user) != bool(password_file):
            raise ValueError("--etcd-user and --etcd-password-file go together")
        access = cls(parsed, cacert, cert, key, user,
                     read_password(password_file) if password_file else "")
        if access.tls and any(e.startswith("http://") for e in parsed):
            raise ValueError("--etcd: http:// means plaintext, but etcd TLS settings are "
                             "given; use https:// endpoints")
        return access

    @classmethod
    def from_env(cls, endpoints: str | Sequence[str] | None = None) -> EtcdAccess:
        """``endpoints`` (default ``$MESH_ETCD_ENDPOINTS``, else 127.0.0.1:2379), with TLS
        and credentials from ``MESH_ETCD_CACERT``, ``_CERT``, ``_KEY``, ``_USER`` and
        ``_PASSWORD_FILE`` (clients and tools; servers take flags)."""
        def get(name: str) -> str:
            return os.environ.get(f"MESH_ETCD_{name}", "")

        return cls.of(endpoints or get("ENDPOINTS") or "127.0.0.1:2379",
                      cacert=get("CACERT"), cert=get("CERT"), key=get("KEY"),
                      user=get("USER"), password_file=get("PASSWORD_FILE"))

    @property
    def tls(self) -> bool:
        return bool(self.cacert or self.cert) or any(
            e.startswith("https://") for e in self.endpoints)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.cacert), private_key=read(self.key),
            certificate_chain=read(self.cert))

    def ssl_context(self) -> ssl.SSLContext:
        """The same trust and client certificate as `channel_credentials`, for `ssl`."""
        context = ssl.create_default_context(cafile=self.cacert or None)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context


def client_for(etcd: EtcdAccess | str | Sequence[str],
               timeout: int = CALL_TIMEOUT) -> EtcdClient:
    """An unconnected client for etcd's endpoints, all of them (see `EtcdClient`).

    ``etcd`` is an `EtcdAccess`, or only endpoints (then: plaintext, no credentials).
    """
    access = etcd if isinstance(etcd, EtcdAccess) else EtcdAccess(parse_endpoints(etcd))
    return EtcdClient(access, timeout)


# A call failing like this says more about the member than about the call: the
# member is down or unreachable, cut off from its cluster's quorum (etcd answers
# "no leader" or "request timed out" with UNAVAILABLE too), or too slow.
_MEMBER_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Calls sent again to the next member after UNAVAILABLE, within the same deadline:
# reads and lease renewals change nothing when they happen twice. Writes (Put, Txn,
# LeaseGrant, LeaseRevoke) are not: the first try may have been applied, so their
# callers, which know what the write means, decide.
_RETRY_SAFE = frozenset({"Range", "LeaseKeepAlive", "LeaseTimeToLive", "LeaseLeases",
                         "Status", "MemberList"})

SLOW_CALL = 0.5
"""A call its caller gave up on (cancelled) after this many seconds without an answer
counts against the member: a healthy etcd answers in milliseconds, and a member whose
process is frozen or whose network is cut keeps the connection but never answers."""

# aetcd's stub attributes, each served by `_FailoverStub` on an `EtcdClient`.
_STUBS = {"auth_stub": rpc.AuthStub, "kvstub": rpc.KVStub, "clusterstub": rpc.ClusterStub,
          "leasestub": rpc.LeaseStub, "maintenancestub": rpc.MaintenanceStub}


class _Member:
    """One etcd endpoint as a client reaches it: its own channel and auth session
    (etcd's default "simple" auth tokens are known only to the member that issued them)."""

    def __init__(self, access: EtcdAccess, endpoint: str, timeout: float | None,
                 options: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.session = _Session(access, endpoint, timeout)
        interceptors = [_UnaryUnary(self.session), _UnaryStream(self.session),
                        _StreamStream(self.session)]
        host, port = split_endpoint(endpoint)
        target, items = f"{host}:{port}", list(options.items())
        if access.tls:
            self.channel = grpc.aio.secure_channel(target, access.channel_credentials(),
                                                   options=items, interceptors=interceptors)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=items,
                                                     interceptors=interceptors)
        self.session.channel = self.channel
        self.stubs = {name: stub(self.channel) for name, stub in _STUBS.items()}
        self.on_leave: set[Callable[[], None]] = set()
        """Called when the client moves away from this member (streams follow it)."""


class _FailoverStub:
    """Stands in for one of aetcd's stubs: each method call goes to the client's
    current member, and fails over to the next as `EtcdClient._call` says."""

    def __init__(self, client: EtcdClient, attr: str) -> None:
        self._client = client
        self._attr = attr

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        if method.startswith("_"):  # not an RPC (copy, pickle and the like probe these)
            raise AttributeError(method)

        async def call(request: Any, timeout: float | None = None,
                       metadata: Any = None) -> Any:
            return await self._client._call(self._attr, method, request, timeout, metadata)
        return call


class EtcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's client for an etcd cluster of one or more members, over TLS when
    `EtcdAccess` says so, authenticating as its user.

    Several endpoints: the client talks to one member at a time and moves to the
    next (in turn, preferring one that has not failed lately) as soon as a call
    there fails the way a dead, cut-off or frozen member makes calls fail
    (`_MEMBER_FAILURES`, or no answer within `SLOW_CALL` before its caller gave
    up). Reads and lease renewals are retried on the next member within their
    deadline; other calls fail once and their callers retry (on the new member).
    Streams opened with `follow_member` (the watches of `watch_prefix`) are ended
    when the client moves, so that they reopen where the client is. This works
    the same for IP addresses and host names (which gRPC's own multi-address
    targets do not take) and leaves a member that is alive but partitioned
    (which gRPC would keep using).

    aetcd's own ``username``/``password`` stay unset: it would authenticate once,
    at connect, and keep sending a token etcd forgets when it restarts. Instead
    interceptors on each channel add the current token to every call (so raw stubs
    on ``client.channel``, like `watch_prefix`'s, get it too), authenticate again
    when etcd says the token is no longer valid, and turn refusals retrying cannot
    fix into `EtcdAccessError`.
    """

    def __init__(self, access: EtcdAccess, timeout: int = CALL_TIMEOUT) -> None:
        if not access.endpoints:
            raise ValueError("no etcd endpoint given")
        for endpoint in access.endpoints:
            split_endpoint(endpoint)  # a malformed one fails now, not at a failover
        host, port = split_endpoint(access.endpoints[0])
        super().__init__(host=host, port=port, timeout=timeout, options=CHANNEL_OPTIONS)
        self.access = access
        self._members: dict[int, _Member] = {}
        self._index = 0
        self._failed_at: dict[int, float] = {}
        """When each member last failed (monotonic), to prefer those that did not."""
        self._session: _Session | None = None
        self.moves = 0
        """How many times the client moved to another member."""

    @property
    def endpoint(self) -> str:
        """The member calls go to now."""
        return self.access.endpoints[self._index]

    async def connect(self) -> None:
        """Open the channel; nothing is sent before the first call (which authenticates)."""
        if self._connected.is_set():
            return
        member = self._use(self._index)
        # What aetcd's connect sets up; metadata stays None (the interceptors add
        # the token). Its shared watcher is unused here (see `watch_prefix`).
        for attr in _STUBS:
            setattr(self, attr, _FailoverStub(self, attr))
        self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(member.channel),
                                              timeout=self._timeout)
        self._connected.set()

    async def close(self) -> None:
        """Close every member's channel; the client may connect again later."""
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.shutdown()
        members, self._members = list(self._members.values()), {}
        for member in members:
            with contextlib.suppress(Exception):
                await member.channel.close()
        self._init_channel_attrs()
        self._session = None
        self._connected.clear()

    def _use(self, index: int) -> _Member:
        member = self._members.get(index)
        if member is None:
            member = self._members[index] = _Member(
                self.access, self.access.endpoints[index], self._timeout, self._options)
        self._index = index
        self._host, self._port = split_endpoint(member.endpoint)
        self._session = member.session
        self.channel = member.channel
        return member

    def _current(self) -> _Member:
        member = self._members.get(self._index)
        return member if member is not None else self._use(self._index)

    def member_failed(self, channel: grpc.aio.Channel | None, why: str) -> None:
        """A call on ``channel`` failed as calls to a lost member do: if the client is
        still on that member, move to the next (concurrent failures move it once)."""
        member = self._members.get(self._index)
        count = len(self.access.endpoints)
        if member is None or member.channel is not channel or count < 2:
            return
        self._failed_at[self._index] = time.monotonic()
        # The next in turn, unless it failed more recently than another: a member
        # that died is not tried again while one that did not is at hand.
        others = [(self._index + k) % count for k in range(1, count)]
        self._use(min(others, key=lambda i: self._failed_at.get(i, -math.inf)))
        self.moves += 1
        log.warning("etcd member %s failed (%s); using %s", member.endpoint, why, self.endpoint)
        callbacks, member.on_leave = member.on_leave, set()
        for callback in callbacks:
            callback()

    def follow_member(self, on_leave: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_leave`` when the client moves away from its current member (a
        stream there should end and reopen); returns the function that unregisters it."""
        member = self._current()
        member.on_leave.add(on_leave)
        return lambda: member.on_leave.discard(on_leave)

    async def _call(self, attr: str, method: str, request: Any, timeout: float | None,
                    metadata: Any) -> Any:
        """``method`` of stub ``attr`` on the current member, failing over as the class
        docstring says."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        tries = len(self.access.endpoints) if method in _RETRY_SAFE else 1
        for attempt in range(1, tries + 1):
            member = self._current()
            left = None if deadline is None else deadline - loop.time()
            started = loop.time()
            try:
                if method == "LeaseKeepAlive":
                    return await _renew_once(member, request, left, metadata)
                stub = getattr(member.stubs[attr], method)
                return await stub(request, timeout=left, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in _MEMBER_FAILURES:
                    raise
                self.member_failed(member.channel, f"{method}: {code.name} {exc.details()}")
                if attempt == tries or code == grpc.StatusCode.DEADLINE_EXCEEDED or (
                        deadline is not None and loop.time() >= deadline):
                    raise
            except asyncio.CancelledError:
                if loop.time() - started >= SLOW_CALL:
                    self.member_failed(member.channel, f"{method}: no answer in "
                                                       f"{loop.time() - started:.1f}s")
                raise
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def refresh_lease(self, lease_id: int, timeout: float | None = None) -> Any:
        """Renew a lease once: etcd's reply (its ``TTL`` is 0 if the lease is gone), or
        None. ``timeout`` bounds the whole renewal (default: the client's timeout)."""
        await self.connect()
        try:
            return await self._call("leasestub", "LeaseKeepAlive",
                                    rpc.LeaseKeepAliveRequest(ID=lease_id),
                                    timeout if timeout is not None else self._timeout, None)
        except grpc.aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)


async def _renew_once(member: _Member, request: Any, timeout: float | None,
                      metadata: Any) -> Any:
    """One LeaseKeepAlive request and its reply, the stream then closed (aetcd leaves it
    open until its deadline, which would then read as a failure of the member)."""
    call = member.stubs["leasestub"].LeaseKeepAlive(iter([request]), timeout=timeout,
                                                    metadata=metadata)
    try:
        async for reply in call:
            return reply
        return None
    finally:
        call.cancel()


_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"
PROBE_TIMEOUT = 2.0


class _Session:
    """One channel's auth token, shared by its interceptors."""

    def __init__(self, access: EtcdAccess, endpoint: str, timeout: float | None) -> None:
        self.access = access
        self.endpoint = endpoint
        self.timeout = timeout
        self.channel: grpc.aio.Channel | None = None
        self.token = ""
        # Until a call has gone through, a connection failure may be a TLS mismatch
        # rather than etcd being down: `explain` then looks closer.
        self.proven = False
        self._lock = asyncio.Lock()
        self._checks: set[asyncio.Task[None]] = set()

    async def current_token(self) -> str:
        """The token to send ("" without a user), authenticating if there is none."""
        if not self.access.user:
            return ""
        return self.token or await self.renew("")

    async def renew(self, stale: str) -> str:
        """Authenticate again, unless another call already replaced ``stale``."""
        async with self._lock:
            if self.token and self.token != stale:
                return self.token
            assert self.channel is not None
            request = rpc.AuthenticateRequest(name=self.access.user,
                                              password=self.access.password)
            try:
                reply = await rpc.AuthStub(self.channel).Authenticate(
                    request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                failure = await self.explain(exc)
                if failure is exc:
                    raise
                raise failure from exc
            self.proven = True
            self.token = str(reply.token)
            return self.token

    def forget(self, token: str) -> None:
        """etcd no longer takes ``token``: the next call authenticates again."""
        if token and self.token == token:
            self.token = ""

    def check_stream(self, call: Any, token: str) -> None:
        """When the streaming ``call`` ends, forget ``token`` if etcd refused it (a stream
        cannot be replayed; its owner retries, and the retry authenticates again)."""
        async def check() -> None:
            with contextlib.suppress(Exception):
                code, details = await call.code(), await call.details()
                if _token_refused(code, details or ""):
                    self.forget(token)

        def done(_call: Any) -> None:
            task = asyncio.ensure_future(check())
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

        if token:
            call.add_done_callback(done)

    async def explain(self, exc: grpc.aio.AioRpcError) -> Exception:
        """An `EtcdAccessError` if ``exc`` comes from settings retrying cannot fix, else
        ``exc`` itself."""
        code, details = exc.code(), exc.details() or ""
        host, port = split_endpoint(self.endpoint)
        user, where = self.access.user, f"etcd at {host}:{port}"
        if "authentication failed" in details:
            return EtcdAccessError(
                f"etcd refused the credentials for user {user!r}: authentication failed")
        if "authentication is not enabled" in details:
            return EtcdAccessError(
                f"{where} has authentication turned off, yet --etcd-user {user!r} is given: "
                "enable it (etcdctl auth enable) or drop the user")
        if "user name is empty" in details:
            return EtcdAccessError(
                f"{where} requires authentication: give --etcd-user and "
                "--etcd-password-file (MESH_ETCD_USER, MESH_ETCD_PASSWORD_FILE)")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            who = f"user {user!r}" if user else "this client (its certificate's CN)"
            return EtcdAccessError(
                f"{where} denied {who}: {details.removeprefix('etcdserver: ')}; grant its "
                "role readwrite on the cluster's key prefix")
        if code == grpc.StatusCode.UNAVAILABLE and not self.proven:
            reason = await tls_mismatch(self.access, self.endpoint)
            if reason is not None:
                return EtcdAccessError(reason)
        return cast(Exception, exc)


def _token_refused(code: grpc.StatusCode, details: str) -> bool:
    """etcd forgot the token (it restarted, or the token expired) or issued it before
    the last change to users and roles: a new one will do."""
    return code == grpc.StatusCode.UNAUTHENTICATED or "auth store is old" in details


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    if not token:
        return details
    kept = [(k, v) for k, v in (details.metadata or ()) if k != "token"]
    return details._replace(metadata=grpc.aio.Metadata(*kept, ("token", token)))


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds the token; on a refused token authenticates again and retries once."""

    def __init__(self, session: _Session) -> None:
        self._session = session

    async def intercept_unary_unary(self, continuation: Any,
                                    client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        session = self._session
        if _method(client_call_details) == _AUTHENTICATE:
            return await continuation(client_call_details, request)  # `renew` explains
        token = await session.current_token()
        for attempt in (1, 2):
            call = await continuation(_with_token(client_call_details, token), request)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                if attempt == 1 and token and _token_refused(exc.code(), exc.details() or ""):
                    token = await session.renew(token)
                    continue
                failure = await session.explain(exc)
                if failure is exc:
                    raise
                raise failure from exc
            session.proven = True
            return call
        raise AssertionError("unreachable")  # the second attempt returns or raises


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds the token (Snapshot and the like)."""

    def __init__(self, session: _Session) -> None:
        self._session = session

    async def intercept_unary_stream(self, continuation: Any,
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        token = await self._session.current_token()
        call = await continuation(_with_token(client_call_details, token), request)
        self._session.check_stream(call, token)
        return call


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds the token (Watch, LeaseKeepAlive)."""

    def __init__(self, session: _Session) -> None:
        self._session = session

    async def intercept_stream_stream(self, continuation: Any,
                                      client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        token = await self._session.current_token()
        call = await continuation(_with_token(client_call_details, token), request_iterator)
        self._session.check_stream(call, token)
        return call


async def tls_mismatch(access: EtcdAccess, endpoint: str = "") -> str | None:
    """Why our TLS settings cannot work with ``endpoint`` (default: the first), found
    with a TLS handshake of our own; None if that is not the problem (etcd down, or
    all well).

    gRPC reports a refused handshake like any failed connection (UNAVAILABLE, which
    callers retry): this tells the two apart, once, so that a wrong CA or a
    plaintext client meeting a TLS etcd fails at once with a line saying so.
    """
    host, port = split_endpoint(endpoint or access.endpoints[0])
    where = f"etcd at {host}:{port}"
    if access.tls:
        context = access.ssl_context()
    else:  # only to ask "does it speak TLS?"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context), PROBE_TIMEOUT)
        if not access.tls:
            return (f"{where} speaks TLS, but no etcd TLS settings are given: give "
                    "--etcd-cacert (MESH_ETCD_CACERT) and https:// endpoints")
        # With TLS 1.3 a server that wants a client certificate says so only after
        # the handshake: its alert is what a first read gets.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)
    except ssl.SSLCertVerificationError as exc:
        return (f"{where}: its TLS certificate is not trusted ({exc.verify_message}); "
                "check --etcd-cacert and the endpoint's host name")
    except ssl.SSLError as exc:
        alert = "ALERT" in (exc.reason or "").upper()
        if not access.tls:
            return (f"{where} speaks TLS, but no etcd TLS settings are given: give "
                    "--etcd-cacert (MESH_ETCD_CACERT) and https:// endpoints") if alert else None
        if alert:
            return (f"{where} refused the TLS connection ({exc.reason}); does it want a client "
                    "certificate (--etcd-cert, --etcd-key) signed by a CA it trusts?")
        return (f"TLS handshake with {where} failed ({exc.reason}): is it serving "
                "plaintext (http://)?")
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return None


class WatchBroken(Exception):
    """The watch ended (compacted revision, cancelled by etcd): read again and re-watch."""


async def watch_prefix(
    client: aetcd.Client, prefix: bytes, start_revision: int
) -> AsyncIterator[tuple[str, bytes, bytes, int]]:
    """Yield ``(kind, key, value, mod_revision)`` for changes under ``prefix``.

    One raw etcd Watch stream per call, rather than aetcd's shared watcher,
    whose internal lock can deadlock when a pending watch is cancelled. Here
    cancelling the consumer cancels the gRPC call, and that is all.

    On an `EtcdClient` the watch lives on the client's current member: it ends
    (`WatchBroken`, or the stream's error) when that member fails or the client
    moves to another one, so that the caller re-watches where the client now is.
    A partitioned member would keep a watch open and silent: etcd's "hasleader"
    metadata makes it end the stream instead once it has no raft leader.
    """
    await client.connect()
    channel = client.channel
    stub = rpc.WatchStub(channel)
    create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
        key=prefix, range_end=aetcd.utils.prefix_range_end(prefix),
        start_revision=start_revision))
    done = asyncio.Event()

    async def requests() -> AsyncIterator[rpc.WatchRequest]:
        yield create
        await done.wait()  # keep our side open: a half-close may end the watch

    metadata = (*(client.metadata or ()), ("hasleader", "true"))
    call = stub.Watch(requests(), metadata=metadata)
    moved = False

    def leave() -> None:
        nonlocal moved
        moved = True
        call.cancel()

    unfollow = client.follow_member(leave) if isinstance(client, EtcdClient) else None
    try:
        async for response in call:
            if response.compact_revision or response.canceled:
                raise WatchBroken(response.cancel_reason or "revision compacted")
            for event in response.events:
                kind = "DELETE" if event.type == rpc.Event.EventType.DELETE else "PUT"
                yield kind, event.kv.key, event.kv.value, event.kv.mod_revision
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if moved and (task is None or not task.cancelling()):
            raise WatchBroken("the client moved to another etcd member") from None
        raise
    except grpc.aio.AioRpcError as exc:
        if isinstance(client, EtcdClient) and exc.code() in _MEMBER_FAILURES:
            client.member_failed(channel, f"Watch: {exc.code().name} {exc.details()}")
        raise
    finally:
        if unfollow is not None:
            unfollow()
        done.set()
        call.cancel()


class PrefixFollower:
    """Keeps a local view of an etcd prefix: one full read, then a watch from its
    revision. If the watch breaks (etcd restarted, compaction, network) it reads
    again and re-watches, with backoff, for as long as it is open.

    ``on_read(kvs)`` gets every ``(key, value, create_revision)`` of a full read
    (the view is replaced); ``on_event(kind, key, value, mod_revision)`` each later
    change ("PUT" or "DELETE"). Both run on the event loop and must not block.
    """

    def __init__(
        self, client: aetcd.Client, prefix: bytes,
        on_read: Callable[[list[tuple[bytes, bytes, int]]], None],
        on_event: Callable[[str, bytes, bytes, int], None],
        name: str = "etcd-follower",
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._on_read = on_read
        self._on_event = on_event
        self._name = name
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the prefix (raising if etcd is unreachable), then follow it."""
        revision = await self._read()
        self._task = asyncio.create_task(self._follow(revision), name=self._name)

    async def refresh(self) -> None:
        """Read the prefix again now; errors are swallowed (the watch keeps trying)."""
        with contextlib.suppress(Exception):
            await self._read()

    async def close(self) -> None:
        task, self._task = self._task, None
        with contextlib.suppress(Exception):
            await cancel(task)  # cancelled again until it ends: see `cancel`

    async def _read(self) -> int:
        async with asyncio.timeout(CALL_TIMEOUT):
            result = await self._client.get_prefix(self._prefix)
        self._on_read([(kv.key, kv.value, int(kv.create_revision)) for kv in result])
        return int(result.header.revision) if result.header is not None else 0

    async def _follow(self, revision: int) -> None:
        delay = 0.1
        while True:
            try:
                async for kind, key, value, mod_revision in watch_prefix(
                        self._client, self._prefix, revision + 1):
                    delay = 0.1
                    revision = max(revision, mod_revision)
                    self._on_event(kind, key, value, mod_revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("%s: watch broke (%s); re-reading", self._name, exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
            with contextlib.suppress(Exception):
                revision = await self._read()


async def renew_lease(client: aetcd.Client, lease_id: int, timeout: float) -> Any:
    """Renew ``lease_id`` once, within ``timeout`` seconds: etcd's reply (``TTL`` <= 0:
    the lease is gone) or None; raises on failure.

    On an `EtcdClient` the timeout is the call's gRPC deadline, so that a member too
    slow to answer counts as failed and the next renewal goes to another; the outer
    bound also covers what precedes the call (authenticating).
    """
    if isinstance(client, EtcdClient):
        return await asyncio.wait_for(client.refresh_lease(lease_id, timeout=timeout),
                                      timeout + 0.1)
    return await asyncio.wait_for(client.refresh_lease(lease_id), timeout)
