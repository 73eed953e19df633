"""A node's unary calls over one stream (``mesh.session.v1``, see `nodes.session`).

In Python gRPC a message on an open stream costs less than half of a unary
call, in the client as in the node, so the typed client sends its unary calls
to each node as messages of one session stream. ``SessionChannel`` stands in
for the node's channel under the generated stubs: their unary methods go
through the session, everything else (server streams) through the channel.
The answer is the unary call's in every respect the caller can see: a response,
or a ``grpc.aio.AioRpcError`` with the same code, details and trailing metadata
(rich error details included), so `clients.errors` and the retries read it the
same way.

What a broken session means for its calls in flight, as for a unary call whose
connection broke: the stream's error, an unknown outcome. A stream the node
ended with OK while calls were unanswered never read them (the node answers
every call it read first): those fail UNAVAILABLE, SHUTTING_DOWN, which the
retries know as not executed. A node without sessions (UNIMPLEMENTED) gets
unary calls from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from mesh.session.v1 import session_pb2

__all__ = ["ENVELOPE_BYTES", "LARGEST_REQUEST", "OPEN", "Session", "SessionChannel"]

log = logging.getLogger(__name__)

OPEN = "/mesh.session.v1.SessionService/Open"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_DETAILS_KEY = "grpc-status-details-bin"
ENVELOPE_BYTES = 64 << 10
"""What a session's envelope may add to an answer (as `nodes.session` has it)."""
LARGEST_REQUEST = 1 << 20
"""Requests larger than this go as unary calls: a message over the node's limit
would end the whole session, and a large request gains nothing from one."""
MAX_TIMEOUT = 86_400.0
"""The longest timeout the node takes (longer ones are sent as this; the client
still keeps its own)."""


def _error(code: grpc.StatusCode, details: str,
           trailing: Sequence[tuple[str, str | bytes]] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing),
                                details=details)


def _not_read(address: str, why: str = "stopped before reading the call"
              ) -> grpc.aio.AioRpcError:
    """A call the node never read: it stopped first, or the client retired its
    session (the retries' not-executed)."""
    info = error_details_pb2.ErrorInfo(reason="SHUTTING_DOWN", domain="mesh")
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=f"{address} {why}")
    status.details.add().Pack(info)
    return _error(grpc.StatusCode.UNAVAILABLE, status.message,
                  ((_DETAILS_KEY, status.SerializeToString()),))


def _broken(error: grpc.aio.AioRpcError, address: str) -> grpc.aio.AioRpcError:
    """What a call in flight on a session that failed with ``error`` gets: the
    failure of a connection, whatever gRPC calls it (a node killed mid-stream can
    surface as INTERNAL "Internal error from Core"), as a unary call would. The
    node's refusal to take a stream at all (RESOURCE_EXHAUSTED past its limit of
    streams) stays as it is."""
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error
    return _error(grpc.StatusCode.UNAVAILABLE,
                  f"the session to {address} broke ({error.code().name}: {error.details()})")


class Unsupported(Exception):
    """The node serves no sessions (an older node): call it directly."""


class _Stream:
    """One Open stream and what is its own: the outbox its request iterator
    drains (a message for the next stream must not be taken by this one's) and
    its calls in flight (a stream the node is closing ends while the next one
    carries new calls)."""

    def __init__(self) -> None:
        self.outbox: deque[session_pb2.OpenRequest | None] = deque()
        self.queued = asyncio.Event()
        self.pending: dict[int, asyncio.Future[session_pb2.OpenResponse]] = {}
        self.reader: asyncio.Task[None] | None = None
        """Reads the answers (held here: the loop keeps only weak references to
        tasks, and the session keeps its open streams)."""

    def send(self, message: session_pb2.OpenRequest | None) -> None:
        """Queue ``message``; None closes the client's side after what is queued."""
        self.outbox.append(message)
        self.queued.set()

    async def requests(self) -> AsyncIterator[session_pb2.OpenRequest]:
        while True:
            while self.outbox:
                message = self.outbox.popleft()
                if message is None:  # close(), the node closing, or the end: half-close
                    return
                yield message
            self.queued.clear()
            await self.queued.wait()


class Session:
    """Streams to one node carrying unary calls: one at a time takes new calls,
    opened on first use and again after it ends or the node closes it."""

    def __init__(self, channel: grpc.aio.Channel, address: str,
                 metadata: Sequence[tuple[str, str]] | None) -> None:
        self._channel = channel
        self.address = address
        self.metadata = tuple(metadata or ())
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        """The stream new calls go on."""
        self._streams: set[_Stream] = set()
        """Every stream still open, the ones the node is closing too."""
        self.unsupported = False
        self.closed = False

    async def call(self, method: str, request: bytes, timeout: float | None) -> bytes:
        """One unary call: the response's bytes, or raises the call's AioRpcError
        (Unsupported if the node serves no sessions)."""
        if self.unsupported:
            raise Unsupported()
        if self.closed:  # the node left the map; a retry finds its successor
            raise _not_read(self.address, "left: the call was not sent")
        if timeout is not None and timeout <= 0:
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        stream = self._stream or self._open()
        call_id = next(self._ids)
        future: asyncio.Future[session_pb2.OpenResponse] = \
            asyncio.get_running_loop().create_future()
        stream.pending[call_id] = future
        message = session_pb2.OpenRequest(call_id=call_id, method=method, request=request)
        if timeout is not None:
            message.timeout.FromNanoseconds(
                max(1, int(min(timeout, MAX_TIMEOUT) * 1e9)))
        stream.send(message)
        try:
            async with asyncio.timeout(timeout):
                answer = await future
        except TimeoutError:
            self._cancel(stream, call_id)
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            self._cancel(stream, call_id)
            raise
        if answer.code == 0:
            return answer.response
        raise _error(_CODES.get(answer.code, grpc.StatusCode.UNKNOWN), answer.message,
                     [(entry.key, entry.value if entry.key.endswith("-bin")
                       else entry.value.decode(errors="replace"))
                      for entry in answer.trailing_metadata])

    def close(self) -> None:
        """Close the sending side: the node answers the calls in flight, then ends
        the stream. New calls fail."""
        self.closed = True
        if self._stream is not None:
            self._stream.send(None)

    def _open(self) -> _Stream:
        open_stream = self._channel.stream_stream(
            OPEN, request_serializer=session_pb2.OpenRequest.SerializeToString,
            response_deserializer=session_pb2.OpenResponse.FromString)
        self._stream = stream = _Stream()
        self._streams.add(stream)
        call = open_stream(stream.requests(), metadata=self.metadata)
        stream.reader = asyncio.get_running_loop().create_task(self._read(stream, call))
        return stream

    @staticmethod
    def _cancel(stream: _Stream, call_id: int) -> None:
        if stream.pending.pop(call_id, None) is not None:
            stream.send(session_pb2.OpenRequest(call_id=call_id, cancel=True))

    def _retire(self, stream: _Stream) -> None:
        """No new calls on ``stream``; the client's side closes after what is queued."""
        if self._stream is stream:
            self._stream = None
        stream.send(None)

    async def _read(self, stream: _Stream, call: grpc.aio.StreamStreamCall) -> None:
        failure: grpc.aio.AioRpcError | None = None
        try:
            async for answer in call:
                if answer.closing:
                    # The node is stopping: it refuses what it reads from now on
                    # and ends the stream once our side is closed.
                    self._retire(stream)
                    continue
                future = stream.pending.pop(answer.call_id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except grpc.aio.AioRpcError as exc:
            failure = _broken(exc, self.address)
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.unsupported = True
        except asyncio.CancelledError:
            failure = _error(grpc.StatusCode.CANCELLED, "the session was cancelled")
            raise
        finally:
            self._retire(stream)  # (ends this stream's request iterator)
            self._streams.discard(stream)
            pending, stream.pending = stream.pending, {}
            for future in pending.values():
                if future.done():
                    continue
                if failure is None:
                    future.set_exception(_not_read(self.address))
                elif self.unsupported:
                    future.set_exception(Unsupported())
                else:
                    future.set_exception(failure)


class _SessionMethod:
    """A unary method of a stub, called through the session (or the channel, on a
    node without sessions)."""

    def __init__(self, session: Session, method: str, serialize: Callable[[Any], bytes],
                 deserialize: Callable[[bytes], Any], direct: Any) -> None:
        self._session = session
        self._method = method
        self._serialize = serialize
        self._deserialize = deserialize
        self._direct = direct

    async def __call__(self, request: Any, *, timeout: float | None = None,
                       metadata: Any = None, **kwargs: Any) -> Any:
        session = self._session
        # A call with metadata of its own (or gRPC options) goes as itself: a
        # session has the metadata it was opened with.
        if not (session.unsupported or kwargs or (
                metadata is not None and tuple(metadata) != session.metadata)):
            raw = self._serialize(request)
            if len(raw) <= LARGEST_REQUEST:
                try:
                    return self._deserialize(await session.call(self._method, raw, timeout))
                except Unsupported:
                    pass  # never sent to the node: call it directly
        return await self._direct(request, timeout=timeout, metadata=metadata, **kwargs)


class SessionChannel:
    """Stands in for a node's channel under a generated stub: unary methods go
    through ``session``, the rest through ``channel``."""

    def __init__(self, channel: grpc.aio.Channel, session: Session) -> None:
        self._channel = channel
        self.session = session

    def unary_unary(self, method: str, request_serializer: Callable[[Any], bytes],
                    response_deserializer: Callable[[bytes], Any],
                    **kwargs: Any) -> _SessionMethod:
        direct = self._channel.unary_unary(method, request_serializer=request_serializer,
                                           response_deserializer=response_deserializer,
                                           **kwargs)
        return _SessionMethod(self.session, method, request_serializer,
                              response_deserializer, direct)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)
