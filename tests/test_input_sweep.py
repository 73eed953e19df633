"""Every public RPC against hostile field values, on a real node (and the
coordinator's AdminService on a real coordinator): whatever a caller puts in a
field, the answer is a clear status (never UNKNOWN, INTERNAL or DATA_LOSS; an
INVALID_ARGUMENT names a field), short (no input echoed whole), and neither
process logs a traceback.

The requests are made from the services' descriptors, so a new method or field is
swept without a line here: for each method, the empty request, then each field
(and each field of a message field, one level down) set to the edge values of
its type: a very long or odd string, long bytes, the integer type's ends, NaN
and infinities, an enum number the schema does not define, negative and huge
durations and times, a long list; each alone, and again on a request whose
other fields hold ordinary values (so it gets past "required" checks). Calls
that would wait (a lock held, a long poll, a watch from a future epoch) are cut
by a short deadline: DEADLINE_EXCEEDED is then the caller's own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message, message_factory
from google.protobuf.descriptor import FieldDescriptor as F

from common.errors import MAX_DETAIL_CHARS, MAX_MESSAGE_CHARS
from common.localmesh import LocalMesh
from coordinator.server import ADMIN_SERVICE
from gateway.__main__ import public_services
from tests.cluster import error_details

LONG = "\u00e9" * 100_000  # 200 kB of UTF-8: far over every bound, under the message limit
ODD = "a/../\x00\u202e\ud7ff"  # a path step, a NUL, a bidi override, the last non-surrogate
INTS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1), F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (2**32 - 1,), F.TYPE_FIXED32: (2**32 - 1,),
    F.TYPE_UINT64: (2**64 - 1,), F.TYPE_FIXED64: (2**64 - 1,),
}
EDGE_SECONDS = (-1, -(2**62), 2**62)
DEADLINE = 3.0
Field = Any
"""A FieldDescriptor (upb's at run time; the stubs know only the Python class)."""
FINE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.CANCELLED}


def _scalars(field: Field) -> Iterator[Any]:
    """Edge values of one non-message field's type."""
    kind = field.type
    if kind == F.TYPE_STRING:
        yield from (LONG, ODD, " ")
    elif kind == F.TYPE_BYTES:
        yield b"\xff" * 200_000
    elif kind in INTS:
        yield from INTS[kind]
    elif kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        yield from (float("nan"), float("inf"), float("-inf"), -1.0)
    elif kind == F.TYPE_ENUM:
        yield 999
    elif kind == F.TYPE_BOOL:
        yield True


def _messages(field: Field, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(label, its fields) pairs for a message field: well-known times and durations
    at their edges, else each of its own fields at theirs (three levels down)."""
    name = field.message_type.full_name
    if name in ("google.protobuf.Duration", "google.protobuf.Timestamp"):
        for seconds in EDGE_SECONDS:
            yield f"{field.name}.seconds={seconds}", {"seconds": seconds}
        yield f"{field.name}.nanos=-1", {"seconds": 1, "nanos": -1}
        return
    for inner in field.message_type.fields:
        if inner.type != F.TYPE_MESSAGE:
            values = ((f"{field.name}.{inner.name}", value) for value in _scalars(inner))
        elif depth < 2 and not _is_map(inner):
            values = ((f"{field.name}.{label}", value)
                      for label, value in _messages(inner, depth + 1))
        else:
            continue
        for label, value in values:
            yield label, {inner.name: [value] if inner.is_repeated else value}


def _is_map(field: Field) -> bool:
    return bool(field.message_type.GetOptions().map_entry)


def _set(request: message.Message, field: Field, value: Any,
         many: bool = False) -> None:
    if field.is_repeated:
        target = getattr(request, field.name)
        if field.type == F.TYPE_MESSAGE:
            if _is_map(field):
                return
            for _ in range(1000 if many else 1):
                target.add(**value)
        else:
            target.extend([value] * (1000 if many else 1))
    elif field.type == F.TYPE_MESSAGE:
        made = message_factory.GetMessageClass(field.message_type)(**value)
        getattr(request, field.name).CopyFrom(made)
    else:
        setattr(request, field.name, value)


def _map_request(cls: type[message.Message], field: Field
                 ) -> message.Message:
    """A request whose map ``field`` holds one entry with an edge key and value."""
    request = cls()
    key_field, value_field = (field.message_type.fields_by_name[n] for n in ("key", "value"))
    key = next(_scalars(key_field))
    if value_field.type == F.TYPE_MESSAGE:
        getattr(request, field.name)[key].SetInParent()
    else:
        getattr(request, field.name)[key] = next(_scalars(value_field))
    return request


def _plain(field: Field) -> Any:
    """An ordinary value of a non-message field (None: leave it unset)."""
    kind = field.type
    if kind == F.TYPE_STRING:
        return "sweep"
    if kind == F.TYPE_BYTES:
        return b"v"
    if kind == F.TYPE_ENUM:
        values = field.enum_type.values
        return values[1].number if len(values) > 1 else None
    if kind in (F.TYPE_BOOL, F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return None
    return 1


def _base(cls: type[message.Message]) -> message.Message:
    """A request with an ordinary value in every scalar field (and one item in
    every scalar list): hostile values set on it get past "field required"
    checks to the checks of their own field and what lies beyond."""
    request = cls()
    for field in cls.DESCRIPTOR.fields:
        if field.type == F.TYPE_MESSAGE or field.containing_oneof is not None:
            continue
        value = _plain(field)
        if value is not None:
            _set(request, field, value)
    return request


def requests(method: descriptor.MethodDescriptor) -> Iterator[tuple[str, message.Message]]:
    """The method's hostile requests, each with a label naming what is set: each
    hostile value alone, and on `_base`."""
    cls = message_factory.GetMessageClass(method.input_type)
    for label, request in _hostile(cls):
        yield label, request
        on_base = _base(cls)
        for field in cls.DESCRIPTOR.fields:  # the hostile value replaces the ordinary one
            if request.HasField(field.name) if field.has_presence \
                    else getattr(request, field.name):
                on_base.ClearField(field.name)
        on_base.MergeFrom(request)
        yield f"{label} (on a plain request)", on_base


def _hostile(cls: type[message.Message]) -> Iterator[tuple[str, message.Message]]:
    yield "(empty)", cls()
    for field in cls.DESCRIPTOR.fields:
        if field.type == F.TYPE_MESSAGE:
            if _is_map(field):
                yield f"{field.name} (edge key and value)", _map_request(cls, field)
                continue
            for label, value in _messages(field):
                request = cls()
                _set(request, field, value)
                yield label, request
            request = cls()
            _set(request, field, {}, many=field.is_repeated)
            yield f"{field.name} (empty message)", request
        else:
            for value in _scalars(field):
                request = cls()
                _set(request, field, value)
                yield f"{field.name}={str(value)[:12]!r}", request
            if field.is_repeated:
                request = cls()
                _set(request, field, "k" if field.type == F.TYPE_STRING else
                     next(_scalars(field)), many=True)
                yield f"{field.name} (1000 items)", request


async def _call(channel: grpc.aio.Channel, method: descriptor.MethodDescriptor,
                request: message.Message) -> grpc.aio.AioRpcError | None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    decode = message_factory.GetMessageClass(method.output_type).FromString
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                          response_deserializer=decode)
            call = stream(request, timeout=DEADLINE)
            async for _ in call:
                break
            call.cancel()
        else:
            unary = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=decode)
            await unary(request, timeout=DEADLINE)
    except grpc.aio.AioRpcError as error:
        return error
    return None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("service", [*public_services(), ADMIN_SERVICE], ids=lambda s: s.name)
async def test_every_field_at_its_edges_gets_a_clear_short_answer(
        shared_node: LocalMesh, service: descriptor.ServiceDescriptor) -> None:
    # The services on the node's client port; the coordinator's AdminService on its own.
    server = shared_node.coordinators[0] if service is ADMIN_SERVICE else shared_node.nodes[0]
    async with grpc.aio.insecure_channel(
            server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        await _sweep(channel, service)
    for process in (shared_node.nodes[0], shared_node.coordinators[0]):
        log = process.child.log_path.read_text(errors="replace")
        assert "Traceback" not in log, log[-4000:]


async def _sweep(channel: grpc.aio.Channel, service: descriptor.ServiceDescriptor) -> None:
    cases = [(method, label, request) for method in service.methods
             if not method.client_streaming for label, request in requests(method)]
    gate = asyncio.Semaphore(16)

    async def one(method: descriptor.MethodDescriptor, request: message.Message
                  ) -> grpc.aio.AioRpcError | None:
        async with gate:
            return await _call(channel, method, request)

    answers = await asyncio.gather(*(one(m, r) for m, _, r in cases))
    wrong, codes = [], Counter[str]()
    for (method, label, _), error in zip(cases, answers, strict=True):
        code = grpc.StatusCode.OK if error is None else error.code()
        codes[code.name] += 1
        if error is None:
            continue
        details = error.details() or ""
        if code not in FINE:
            wrong.append(f"{method.name} {label}: {code.name} {details[:200]!r}")
        if len(details) > MAX_MESSAGE_CHARS:
            wrong.append(f"{method.name} {label}: a {len(details)}-character message")
        _, metadata, violations = error_details(error)
        if code == grpc.StatusCode.INVALID_ARGUMENT and not violations:
            wrong.append(f"{method.name} {label}: INVALID_ARGUMENT naming no field "
                         f"({details[:100]!r})")
        for text in (*metadata.values(), *violations.values(), *violations):
            if len(text) > MAX_DETAIL_CHARS:
                wrong.append(f"{method.name} {label}: a {len(text)}-character detail")
    print(f"{service.name}: {len(cases)} calls, {dict(codes)}")
    assert not wrong, "\n".join(wrong)
