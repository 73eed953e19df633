"""Sessions: a client's unary calls as the messages of one stream (``mesh.session.v1``).

In Python gRPC a message on an open stream costs less than half of what a
unary call costs, on each side; a sequential caller (a lock taken and released
in a loop) spends most of its time there. A session runs each call through
the very handler the unary method has (``Calls``, filled by
``nodes.rpc.add_service``): the same parsing, authentication against the
stream's metadata (for every call, so a token that expires mid-session stops
working), rate limits, metrics and statuses. Only the transport differs.

The protocol's promises, which the client relies on:

- every call the node read gets exactly one ``OpenResponse``, unless the
  client cancelled it;
- the stream ends with OK only after every call read has been answered, so a
  call still unanswered at that point was never read (not executed);
- a stopping node says so (``closing``), answers the calls it reads from then
  on UNAVAILABLE (SHUTTING_DOWN, not executed), and ends each session once the
  client has closed its side (it does at once) and the calls in flight have
  been answered. Ending a stream the client still writes to could break it for
  the client (gRPC may report INTERNAL), and the calls it had sent meanwhile
  would have an unknown outcome instead of a refusal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import message

from common import tracing
from common.errors import MeshStatusError, Reason, invalid_argument
from mesh.session.v1 import session_pb2

__all__ = ["ENVELOPE_BYTES", "MAX_TIMEOUT", "SERVICE", "CallContext", "Calls", "Sessions"]

log = logging.getLogger(__name__)

SERVICE = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
ENVELOPE_BYTES = 64 << 10
"""Room for an ``OpenResponse``'s own fields around an answer: a node's send limit
is its message limit plus this, so any answer a unary call could carry fits."""
MAX_TIMEOUT = 86_400.0
"""The longest timeout a call may ask for, seconds."""

Handler = Callable[[bytes, grpc.aio.ServicerContext], Any]


class Calls:
    """The unary methods a session may call: full name -> (handler, serializer)."""

    def __init__(self) -> None:
        self._methods: dict[str, tuple[Handler, Callable[[Any], bytes]]] = {}

    def add(self, name: str, handler: Handler, serialize: Callable[[Any], bytes]) -> None:
        self._methods[name] = (handler, serialize)

    def get(self, name: str) -> tuple[Handler, Callable[[Any], bytes]] | None:
        return self._methods.get(name)


class CallContext:
    """What a handler sees of its call inside a session: the five methods of
    ``grpc.aio.ServicerContext`` Mesh's handlers use."""

    __slots__ = ("_deadline", "_metadata", "status")

    def __init__(self, metadata: Sequence[tuple[str, str | bytes]],
                 deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self.status: tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]] | None \
            = None

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def code(self) -> grpc.StatusCode | None:
        return self.status[0] if self.status is not None else None

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> NoReturn:
        self.status = (code, details, tuple(trailing_metadata))
        raise grpc.aio.AbortError()  # as gRPC's own abort does

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)


def _metadata_entries(pairs: Sequence[tuple[str, str | bytes]]) -> list[session_pb2.Metadatum]:
    return [session_pb2.Metadatum(key=key, value=value.encode() if isinstance(value, str)
                                  else value) for key, value in pairs]


def _ended(call_id: int, code: grpc.StatusCode, details: str,
           trailing: Sequence[tuple[str, str | bytes]] = ()) -> session_pb2.OpenResponse:
    """The answer of a call that failed with this status."""
    return session_pb2.OpenResponse(call_id=call_id, code=code.value[0], message=details,
                                    trailing_metadata=_metadata_entries(trailing))


_CLOSING = session_pb2.OpenResponse(closing=True)
"""A stopping node's word to the client: close your side, call on a new stream."""


def _failed(call_id: int, error: MeshStatusError) -> session_pb2.OpenResponse:
    status = error.to_status()
    return _ended(call_id, status.code, status.details, status.trailing_metadata)


class _Admission:
    """Calls in flight on all of a node's sessions, against its limit
    (``--max-concurrent-rpcs``, which gRPC applies to whole streams only)."""

    __slots__ = ("limit", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def full(self) -> bool:
        return 0 < self.limit <= self.running

    def done(self, _task: object) -> None:
        self.running -= 1


class _Session:
    """One open stream: reads calls, runs each in its own task, writes answers."""

    def __init__(self, calls: Calls, requests: AsyncIterator[bytes],
                 context: grpc.aio.ServicerContext, admission: _Admission) -> None:
        self._calls = calls
        self._requests = requests
        self._admission = admission
        self._metadata = tuple(context.invocation_metadata() or ())
        self._running: dict[int, asyncio.Task[None]] = {}
        self._answers: asyncio.Queue[session_pb2.OpenResponse | None] = asyncio.Queue()
        self._reading = True
        self._stopping = False
        self._error: MeshStatusError | None = None

    async def serve(self) -> AsyncIterator[session_pb2.OpenResponse]:
        """The answers, until the client closes its side (or the node stops) and
        every call read is answered; raises MeshStatusError on a protocol error.
        (An async generator, not reads and writes on the context: gRPC's tracing
        interceptor takes stream handlers to be generators.)"""
        reader = asyncio.create_task(self._read())
        try:
            while (answer := await self._answers.get()) is not None:
                yield answer
            if self._error is not None:
                raise self._error
        finally:
            reader.cancel()
            for task in self._running.values():
                task.cancel()

    def stop(self) -> None:
        """Refuse new calls and tell the client; end once it has closed its side
        and the calls in flight are answered."""
        if self._stopping:
            return
        self._stopping = True
        self._answers.put_nowait(_CLOSING)

    async def _read(self) -> None:
        try:
            async for raw in self._requests:
                try:
                    request = session_pb2.OpenRequest.FromString(raw)
                except message.DecodeError:
                    raise invalid_argument("request", "not a valid OpenRequest") from None
                self._start(request)
        except MeshStatusError as exc:
            self._error = exc
            self._answers.put_nowait(None)
        except Exception as exc:  # the stream broke (the client went away)
            log.debug("a session's stream ended: %r", exc)
        finally:
            self._reading = False
            self._end_if_idle()

    def _start(self, request: session_pb2.OpenRequest) -> None:
        call_id = request.call_id
        if request.cancel:
            task = self._running.pop(call_id, None)
            if task is not None:  # else it ended already: its answer is on its way
                task.cancel()
                self._end_if_idle()
            return
        if call_id in self._running:
            raise invalid_argument("call_id", f"call {call_id} is already in flight on "
                                   "this session")
        entry = self._calls.get(request.method)
        timeout = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") \
            else None
        refusal = self._refusal(entry is None, timeout)
        if refusal is not None:
            self._answers.put_nowait(_failed(call_id, refusal))
            return
        assert entry is not None
        task = self._running[call_id] = asyncio.create_task(
            self._run(call_id, request.method, request.request, entry, timeout))
        self._admission.running += 1
        task.add_done_callback(self._admission.done)

    def _refusal(self, unknown: bool, timeout: float | None) -> MeshStatusError | None:
        if self._stopping:
            return MeshStatusError(grpc.StatusCode.UNAVAILABLE,
                                   "the node is stopping; call another", Reason.SHUTTING_DOWN)
        if self._admission.full():
            return MeshStatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the node has {self._admission.limit} calls in flight (its limit); back off",
                Reason.TOO_MANY_CALLS)
        if unknown:
            return MeshStatusError(grpc.StatusCode.UNIMPLEMENTED,
                                   "method: not a unary method of this node's public services",
                                   Reason.UNKNOWN_METHOD)
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            return invalid_argument("timeout", f"must be positive and at most "
                                    f"{MAX_TIMEOUT:.0f} s")
        return None

    async def _run(self, call_id: int, method: str, raw: bytes,
                   entry: tuple[Handler, Callable[[Any], bytes]], timeout: float | None) -> None:
        handler, serialize = entry
        loop = asyncio.get_running_loop()
        context = CallContext(self._metadata,
                              None if timeout is None else loop.time() + timeout)
        answer: session_pb2.OpenResponse
        try:
            # A call's own span, as gRPC's server interceptor makes for a unary
            # call (a traced client calls without a session: its span context
            # travels in each call's metadata).
            with tracing.span(method, server=True):
                async with asyncio.timeout(timeout):
                    response = await handler(raw, cast(grpc.aio.ServicerContext, context))
            answer = session_pb2.OpenResponse(call_id=call_id, response=serialize(response))
        except grpc.aio.AbortError:
            answer = _ended(call_id, *(context.status or (
                grpc.StatusCode.INTERNAL, "internal error", ())))
        except TimeoutError:
            answer = _ended(call_id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except asyncio.CancelledError:
            # The client cancelled the call (it expects no answer) or the
            # session ended.
            raise
        except Exception:  # the handlers turn every error into a status; a bug
            log.exception("%s failed in a session", method)
            answer = _failed(call_id, MeshStatusError(
                grpc.StatusCode.INTERNAL, "internal error (logged by the node)",
                Reason.INTERNAL))
        if self._running.pop(call_id, None) is not None:
            self._answers.put_nowait(answer)
            self._end_if_idle()

    def _end_if_idle(self) -> None:
        if not self._reading and not self._running:
            self._answers.put_nowait(None)


class Sessions:
    """The ``SessionService`` of a node's client port."""

    def __init__(self, calls: Calls, max_calls: int = 0) -> None:
        """``max_calls``: calls in flight on all sessions together before new ones
        are refused RESOURCE_EXHAUSTED (0: no limit)."""
        self._calls = calls
        self._admission = _Admission(max_calls)
        self._open: set[_Session] = set()
        self._stopping = False

    def stop(self) -> None:
        """Refuse new calls (not executed) from now on, and end each session once
        its client has closed its side and its calls in flight are answered (the
        server's grace period ends those whose client does not)."""
        self._stopping = True
        for session in self._open:
            session.stop()

    def handler(self) -> grpc.GenericRpcHandler:
        async def open_session(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[session_pb2.OpenResponse]:
            session = _Session(self._calls, requests, context, self._admission)
            if self._stopping:
                session.stop()
            self._open.add(session)
            try:
                async for answer in session.serve():
                    yield answer
            except MeshStatusError as exc:
                await context.abort_with_status(exc.to_status())
            finally:
                self._open.discard(session)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Open": grpc.stream_stream_rpc_method_handler(
                open_session, request_deserializer=None,
                response_serializer=session_pb2.OpenResponse.SerializeToString),
        })
