"""JSON <-> protobuf for one route, by protobuf's canonical JSON mapping.

Requests: the path variables, then the query parameters (routes without a
body) or the JSON body (``body: "*"``: the whole request; ``body: "field"``:
that field, with query parameters for the rest) become one dict that
``json_format.ParseDict`` turns into the request message. Unknown fields,
wrong types (``true`` for a number too, which json_format alone would take for 1)
and bad enum names are errors that name the field (``FieldError``).
Either JSON name is accepted on input: ``only_if_version`` or ``onlyIfVersion``.

Responses keep the proto field names (``expire_time``, as in the protos, the
README's grpcurl examples and the OpenAPI document) and print fields that are
at their default (``"found": false``, ``"version": "0"``), so every answer of
a method has the same shape. 64-bit integers are JSON strings and bytes are
base64, as the mapping says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import descriptor, json_format, message, message_factory

from gateway.rules import Route

__all__ = ["FieldError", "message_of", "query_fields", "request_of", "to_json"]

FieldDescriptor = descriptor.FieldDescriptor

_QUERY_MESSAGES = frozenset({"google.protobuf.Duration", "google.protobuf.Timestamp",
                             "google.protobuf.FieldMask"})
"""Message types that are plain strings in JSON, so a query parameter can carry them."""


class FieldError(ValueError):
    """Bad input at the edge: ``field`` names what is wrong (``body`` for the body
    as a whole), ``description`` says why."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def query_fields(route: Route) -> list[FieldDescriptor]:
    """The request fields a query parameter may set on ``route``: top-level scalars,
    enums and string-like well-known types not bound by the path, and only for
    routes whose body is not the whole request."""
    if route.body == "*":
        return []
    bound = set(route.variables) | ({route.body} if route.body else set())
    fields = []
    for f in route.method.input_type.fields:
        if f.name in bound:
            continue
        if f.message_type is not None and (
                f.message_type.full_name not in _QUERY_MESSAGES or f.is_repeated):
            continue
        fields.append(f)
    return fields


def _query_value(f: FieldDescriptor, value: str) -> Any:
    if f.type == FieldDescriptor.TYPE_BOOL:
        if value in ("true", "1", ""):
            return True
        if value in ("false", "0"):
            return False
        raise FieldError(f.name, f"{value!r} is not a boolean (true or false)")
    return value  # the JSON mapping accepts numbers as strings


def _query(route: Route, params: Iterable[tuple[str, str]]) -> dict[str, Any]:
    by_name: dict[str, FieldDescriptor] = {}
    for f in query_fields(route):
        by_name[f.name] = by_name[f.json_name] = f
    values: dict[str, Any] = {}
    for name, value in params:
        found = by_name.get(name)
        if found is None:
            raise FieldError(name, "unknown query parameter" + (
                "" if by_name else ": this route takes none"))
        f = found
        if f.is_repeated:
            values.setdefault(f.name, []).append(_query_value(f, value))
        elif f.name in values:
            raise FieldError(f.name, "given more than once")
        else:
            values[f.name] = _query_value(f, value)
    return values


def _body(raw: bytes) -> Any:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FieldError("body", f"not valid JSON: {exc}") from None
    except RecursionError:
        raise FieldError("body", "nested too deeply") from None


def _present(fields: Mapping[str, Any], f: FieldDescriptor) -> str | None:
    """The key under which ``f`` appears in a JSON object, if it does."""
    for key in (f.name, f.json_name):
        if key in fields:
            return key
    return None


def request_of(route: Route, variables: Mapping[str, str],
               params: Iterable[tuple[str, str]], raw_body: bytes) -> message.Message:
    """The request message of a call to ``route``; raises FieldError."""
    params = list(params)
    input_type = route.method.input_type
    fields = input_type.fields_by_name
    values: dict[str, Any] = {}
    if route.body == "*":
        if params:
            raise FieldError(params[0][0],
                             "unknown query parameter: this route takes a JSON body")
        body = _body(raw_body)
        if not isinstance(body, dict):
            raise FieldError("body", f"must be a JSON object ({input_type.name})")
        values.update(body)
    else:
        values.update(_query(route, params))
        if route.body:
            values[route.body] = _body(raw_body)
        elif raw_body.strip():
            raise FieldError("body", f"{route.http_method} {route.template} takes no body")
    for name, value in variables.items():
        f = fields[name]
        key = _present(values, f)
        if key is not None and str(values[key]) != value:
            raise FieldError(name, f"the body says {values[key]!r}, the path {value!r}")
        if key is not None:
            del values[key]
        values[name] = value
    return message_of(route, values)


def message_of(route: Route, values: dict[str, Any]) -> message.Message:
    """``route``'s request message from its JSON object; raises FieldError."""
    input_type = route.method.input_type
    _no_stray_booleans(values, input_type, "")
    request = message_factory.GetMessageClass(input_type)()
    try:
        json_format.ParseDict(values, request)
    except json_format.ParseError as exc:
        raise _field_error(str(exc), input_type, values) from None
    return request


def _no_stray_booleans(value: Any, message_type: descriptor.Descriptor, path: str) -> None:
    """Refuse ``true``/``false`` where a number or an enum is expected: json_format
    takes them for 1 and 0 (a Python bool is an int), the JSON mapping does not."""
    if not isinstance(value, dict):
        return
    fields = {**{f.json_name: f for f in message_type.fields}, **message_type.fields_by_name}
    for key, item in value.items():
        f = fields.get(key)
        if f is None:
            continue  # json_format names the unknown field
        where = f"{path}.{f.name}" if path else f.name
        items = item if f.is_repeated and isinstance(item, list) else [item]
        for i, one in enumerate(items):
            at = f"{where}[{i}]" if f.is_repeated else where
            if f.message_type is not None:
                if f.message_type.GetOptions().map_entry and isinstance(one, dict):
                    value_field = f.message_type.fields_by_name["value"]
                    if value_field.message_type is not None:
                        for k, v in one.items():
                            _no_stray_booleans(v, value_field.message_type, f"{at}[{k}]")
                else:
                    _no_stray_booleans(one, f.message_type, at)
            elif isinstance(one, bool) and f.type != FieldDescriptor.TYPE_BOOL:
                raise FieldError(at, f"{_expected(f)} (not {str(one).lower()})")


_UNKNOWN = re.compile(r'has no field named "([^"]+)" at "([^"]+)"')
_AT = re.compile(r" at ([\w.\[\]]+)\.?$")
_PREFIX = re.compile(r"^Failed to parse (\w+) field: ")


def _field_error(text: str, input_type: descriptor.Descriptor,
                 values: dict[str, Any]) -> FieldError:
    """A FieldError naming the field a json_format.ParseError is about, and saying
    what that field takes (`_expected`): the error's own text may quote Python's
    exceptions ("invalid literal for int() with base 10"), no answer for a caller.

    Its messages name the field in one of three ways, depending on the error: a
    ``has no field named "x" at "Msg.path"``, a trailing ``at Msg.path`` or
    only the chain of ``Failed to parse f field:`` prefixes."""
    first = text.splitlines()[0] if text else text
    unknown = _UNKNOWN.search(first)
    if unknown:
        where = unknown.group(2).split(".", 1)[1:]  # drop the message name
        return FieldError(".".join([*where, unknown.group(1)]), "unknown field")
    chain: list[str] = []
    rest = first
    while (prefix := _PREFIX.match(rest)) is not None:
        chain.append(prefix.group(1))
        rest = rest[prefix.end():]
    at = _AT.search(rest)
    if at and "." in at.group(1).rstrip("."):
        path = at.group(1).rstrip(".").split(".", 1)[1]
        rest = rest[: at.start()]
    else:
        path = _indexed(input_type, chain, values) if chain else "body"
    if path == "body":
        return FieldError(path, "not a valid request")
    whole = _WHOLE.search(first) is not None
    return FieldError(path, _expected(_field_at(input_type, path), whole))


def _indexed(message_type: descriptor.Descriptor | None, chain: list[str],
             values: Any) -> str:
    """``chain`` (json_format's ``Failed to parse f field:`` names) as a path with
    the index of the first item of each list on the way that fails alone:
    ``events[1].id``, where the chain says only ``events.id``."""
    parts = []
    for i, name in enumerate(chain):
        field = message_type.fields_by_name.get(name) if message_type is not None else None
        value = values.get(name) if isinstance(values, dict) else None
        message_type = field.message_type if field is not None else None
        if field is None or message_type is None or message_type.GetOptions().map_entry \
                or not isinstance(value, list) or i == len(chain) - 1:
            parts.append(name)
            values = value
            continue
        item_class = message_factory.GetMessageClass(message_type)
        bad = next((k for k, item in enumerate(value) if not _parses(item, item_class)), None)
        parts.append(name if bad is None else f"{name}[{bad}]")
        values = value[bad] if bad is not None else None
    return ".".join(parts)


def _parses(item: Any, item_class: type[message.Message]) -> bool:
    try:
        json_format.ParseDict(item, item_class())
    except json_format.ParseError:
        return False
    return True


_SEGMENT = re.compile(r"(\w+)(?:\[[^\]]*\])*(?:\.|$)")
_WHOLE = re.compile(r"must be in (\[\]|a dict)")
"""json_format's words when a list or map field was given something else."""
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_WELL_KNOWN = {
    "google.protobuf.Duration": 'a duration in seconds such as "1.5s"',
    "google.protobuf.Timestamp": 'an RFC 3339 time such as "2026-01-31T12:00:00Z"',
    "google.protobuf.FieldMask": "field paths separated by commas",
}


def _field_at(message_type: descriptor.Descriptor | None, path: str) -> FieldDescriptor | None:
    """The field ``path`` names (``events[1].id``, ``labels[k]``), if it does."""
    field = None
    at = 0
    while at < len(path):
        segment = _SEGMENT.match(path, at)
        if segment is None or message_type is None:
            return None
        field = message_type.fields_by_name.get(segment.group(1))
        if field is None:
            return None
        message_type = field.message_type
        if message_type is not None and message_type.GetOptions().map_entry \
                and segment.end() < len(path):  # into a map's value
            message_type = message_type.fields_by_name["value"].message_type
        at = segment.end()
    return field


def _expected(field: FieldDescriptor | None, whole: bool = False) -> str:
    """What ``field`` takes, in words a caller can act on (never the input itself);
    ``whole``: the list or map itself was wrong, not one of its items."""
    if field is None:
        return "invalid value"
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        return "expected an object" if whole else _expected(entry.fields_by_name["value"])
    if field.is_repeated and whole:
        return "expected a list"
    if entry is not None:
        return "expected " + _WELL_KNOWN.get(entry.full_name, "an object")
    if field.enum_type is not None:
        names = [v.name for v in field.enum_type.values]
        return "expected one of " + ", ".join(names)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "expected true or false"
    if field.type == FieldDescriptor.TYPE_STRING:
        return "expected a string"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return "expected base64 text"
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        return f"expected an integer from {low} to {high}"
    return "expected a number"


def to_json(response: message.Message) -> dict[str, Any]:
    """A response message as the gateway's JSON (proto names, defaults printed)."""
    result: dict[str, Any] = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return result
