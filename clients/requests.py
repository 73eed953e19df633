"""Requests built from what a caller gave, with protobuf's refusals named.

protobuf checks each field as it is set, and refuses an int past the field's
range (``ValueError: Value out of range: -1``) or a value of another type
(``TypeError: 'str' object cannot be interpreted as an integer``) in words that
name nothing the caller wrote. `build` makes a request as its constructor does,
and is typed as it is (mypy still checks the fields); when protobuf refuses a
field, the caller gets what a node would have answered: an
`InvalidArgumentError` naming the field and its range, or a TypeError naming the
field and what it takes. Nothing is sent. The value itself is not repeated (an
int can have any number of digits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from clients.errors import InvalidArgumentError

__all__ = ["build", "under"]

M = TypeVar("M", bound=Message)
P = ParamSpec("P")

_F = FieldDescriptor
_INT32, _INT64 = (-(1 << 31), (1 << 31) - 1), (-(1 << 63), (1 << 63) - 1)
_UINT32, _UINT64 = (0, (1 << 32) - 1), (0, (1 << 64) - 1)
_RANGES = {
    _F.TYPE_INT32: _INT32, _F.TYPE_SINT32: _INT32, _F.TYPE_SFIXED32: _INT32,
    _F.TYPE_INT64: _INT64, _F.TYPE_SINT64: _INT64, _F.TYPE_SFIXED64: _INT64,
    _F.TYPE_UINT32: _UINT32, _F.TYPE_FIXED32: _UINT32,
    _F.TYPE_UINT64: _UINT64, _F.TYPE_FIXED64: _UINT64,
}
_KINDS = {_F.TYPE_STRING: "a str", _F.TYPE_BYTES: "bytes", _F.TYPE_BOOL: "a bool",
          _F.TYPE_DOUBLE: "a number", _F.TYPE_FLOAT: "a number", _F.TYPE_ENUM: "an int"}


def build(cls: Callable[P, M]) -> Callable[P, M]:
    """``cls``'s constructor (typed as it is: ``build(pb.ReadRequest)(stream=...)``),
    raising an error that names the field protobuf refuses."""
    def make(*args: P.args, **fields: P.kwargs) -> M:
        try:
            return cls(*args, **fields)
        except (ValueError, TypeError):
            refusal = _refusal(cast("type[Message]", cls), fields)
            if refusal is None:  # no one field alone: protobuf's own words
                raise
            raise refusal from None
    return make


def under(prefix: str, error: InvalidArgumentError) -> InvalidArgumentError:
    """``error`` about a message that sits at ``prefix`` in the request (``jobs[3]``),
    its fields named from the request's root, as a node names them."""
    violations = error.field_violations.items()
    return InvalidArgumentError(
        f"{prefix}.{error.message}",
        field_violations={f"{prefix}.{field}": why for field, why in violations})


def _refusal(cls: type[Message], fields: dict[str, Any]) -> Exception | None:
    """The error naming the first of ``fields`` that ``cls`` refuses alone (None:
    a name the request does not have, a mistake of the client's own)."""
    for name, value in fields.items():
        try:
            cls(**{name: value})
        except ValueError:
            field = _field(cls, name)
            if field is None:
                return None
            span = _RANGES.get(field.type)
            why = f"must be from {span[0]} to {span[1]}" if span else "is not a value it takes"
            return InvalidArgumentError.of_field(name, why)
        except TypeError:
            field = _field(cls, name)
            if field is None:
                return None
            if field.is_repeated and isinstance(value, list | tuple):
                for i, item in enumerate(value):  # name the item, not the list
                    try:
                        cls(**{name: [item]})
                    except (ValueError, TypeError):
                        return TypeError(f"{name}[{i}]: {_kind(field)}, "
                                         f"not {type(item).__name__}")
            kind = _kind(field)
            if field.is_repeated:
                kind = f"a list of {kind.split(' ', 1)[-1]}"
            return TypeError(f"{name}: {kind}, not {type(value).__name__}")
    return None


def _field(cls: type[Message], name: str) -> FieldDescriptor | None:
    return cast("FieldDescriptor | None", cls.DESCRIPTOR.fields_by_name.get(name))


def _kind(field: FieldDescriptor) -> str:
    """What one value of ``field`` is, with its article."""
    if field.type == _F.TYPE_MESSAGE and field.message_type is not None:
        name = field.message_type.name
        return f"{'an' if name[0] in 'AEIOU' else 'a'} {name}"
    if field.type in _RANGES:
        return "an int"
    return _KINDS.get(field.type, "a value of its type")
