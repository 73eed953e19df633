"""The OpenAPI 3 document of the gateway's routes, and a plain docs page.

Built from the same routes the gateway serves (so it lists every one of them)
and from the protos' comments, which ``tools/generate.py`` keeps in
``mesh/descriptors.binpb`` beside the generated code. Schemas follow the
JSON the gateway reads and writes: proto field names, 64-bit integers as
strings, bytes as base64, enums by name, Duration and Timestamp as strings.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, descriptor_pb2

from gateway.rules import Route
from gateway.transcode import query_fields

__all__ = ["Comments", "docs_page", "document"]

FD = descriptor.FieldDescriptor

_SCALARS: dict[int, dict[str, Any]] = {
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FD.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    FD.TYPE_INT64: {"type": "string", "format": "int64"},
    FD.TYPE_SINT64: {"type": "string", "format": "int64"},
    FD.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FD.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FD.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Duration": {"type": "string", "example": "1.5s",
                                 "description": "Seconds with an 's' suffix."},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Empty": {"type": "object"},
}
STATUS_SCHEMA = "google.rpc.Status"


class Comments:
    """Leading comments of services, methods, messages, fields and enums by full name."""

    def __init__(self, by_name: dict[str, str] | None = None) -> None:
        self.by_name = by_name or {}

    @classmethod
    def load(cls, path: Path) -> Comments:
        """From a FileDescriptorSet with source info; empty if the file is missing."""
        if not path.exists():
            return cls()
        files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
        by_name: dict[str, str] = {}
        for f in files:
            names = _names(f)
            for location in f.source_code_info.location:
                name = names.get(tuple(location.path))
                text = location.leading_comments.strip()
                if name and text:
                    by_name[name] = " ".join(text.split())
        return cls(by_name)

    def of(self, full_name: str) -> str:
        return self.by_name.get(full_name, "")


def _names(f: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Source-info path -> full name, for every element a comment can describe."""
    names: dict[tuple[int, ...], str] = {}

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        full = f"{prefix}.{m.name}"
        names[path] = full
        for i, field in enumerate(m.field):
            names[(*path, 2, i)] = f"{full}.{field.name}"
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, 3, i), full)
        for i, enum in enumerate(m.enum_type):
            names[(*path, 4, i)] = f"{full}.{enum.name}"

    for i, m in enumerate(f.message_type):
        message(m, (4, i), f.package)
    for i, e in enumerate(f.enum_type):
        names[(5, i)] = f"{f.package}.{e.name}"
    for i, s in enumerate(f.service):
        names[(6, i)] = f"{f.package}.{s.name}"
        for j, method in enumerate(s.method):
            names[(6, i, 2, j)] = f"{f.package}.{s.name}.{method.name}"
    return names


class _Schemas:
    """components.schemas, filled as messages are referenced."""

    def __init__(self, comments: Comments) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {}

    def ref(self, message: descriptor.Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder against recursion
            properties = {f.name: self.field(f) for f in message.fields}
            schema: dict[str, Any] = {"type": "object", "properties": properties}
            text = self.comments.of(message.full_name)
            if text:
                schema["description"] = text
            self.schemas[message.full_name] = schema
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def field(self, f: FD, *, described: bool = True) -> dict[str, Any]:
        message_type = f.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            value = message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object",
                                      "additionalProperties": self.single(value)}
        elif f.is_repeated:
            schema = {"type": "array", "items": self.single(f)}
        else:
            schema = self.single(f)
        text = self.comments.of(f.full_name) if described else ""
        if text:
            # A $ref cannot have siblings in OpenAPI 3.0: wrap it.
            schema = {"allOf": [schema], "description": text} if "$ref" in schema \
                else {**schema, "description": text}
        return schema

    def single(self, f: FD) -> dict[str, Any]:
        if f.message_type is not None:
            return self.ref(f.message_type)
        if f.enum_type is not None:
            return {"type": "string", "enum": [v.name for v in f.enum_type.values]}
        return dict(_SCALARS[f.type])


def _status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "google.rpc.Status: the gRPC code (number), a message, and "
                       "details (ErrorInfo with a stable reason, BadRequest naming the "
                       "fields, RetryInfo), each with its '@type'.",
        "properties": {
            "code": {"type": "integer", "format": "int32"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {
                "type": "object", "properties": {"@type": {"type": "string"}},
                "additionalProperties": True}},
        },
    }


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    method = route.method
    service = method.containing_service
    fields = method.input_type.fields_by_name
    parameters: list[dict[str, Any]] = []
    for name in route.variables:
        parameters.append({"name": name, "in": "path", "required": True,
                           "schema": schemas.single(fields[name]),
                           "description": schemas.comments.of(fields[name].full_name)})
    for f in query_fields(route):
        parameters.append({"name": f.name, "in": "query", "required": False,
                           "schema": schemas.field(f, described=False),
                           "description": schemas.comments.of(f.full_name)})
    text = schemas.comments.of(method.full_name)
    operation: dict[str, Any] = {
        "operationId": f"{service.name}_{method.name}",
        "tags": [service.full_name],
        "summary": text.split(". ")[0] if text else method.name,
        "description": f"{text}\n\ngRPC: `{route.path}`".strip(),
        "parameters": parameters,
        "responses": {
            "default": {"description": "An error (google.rpc.Status).",
                        "content": {"application/json": {
                            "schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}}}},
        },
    }
    output = schemas.ref(method.output_type)
    if route.streaming:
        operation["responses"]["200"] = {
            "description": "Server-Sent Events: each `data:` line is one message in JSON "
                           "(schema below); `event: end` when the stream ends, `event: "
                           "error` (a google.rpc.Status plus last_event_id) when it fails.",
            "content": {"text/event-stream": {"schema": output}}}
    else:
        operation["responses"]["200"] = {"description": "OK",
                                         "content": {"application/json": {"schema": output}}}
    if route.body:
        body = schemas.ref(method.input_type) if route.body == "*" \
            else schemas.field(fields[route.body], described=False)
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": body}}}
    return operation


def document(routes: Iterable[Route], comments: Comments) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``routes``."""
    schemas = _Schemas(comments)
    paths: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    tags: dict[str, str] = {}
    for route in routes:
        operation = _operation(route, schemas)
        # Additional bindings of one method need distinct operation ids.
        count = seen.get(operation["operationId"], 0)
        seen[operation["operationId"]] = count + 1
        if count:
            operation["operationId"] += f"_{count + 1}"
        service = route.method.containing_service
        tags[service.full_name] = comments.of(service.full_name)
        paths.setdefault(route.template, {})[route.http_method.lower()] = operation
    schemas.schemas[STATUS_SCHEMA] = _status_schema()
    return {
        "openapi": "3.0.3",
        "info": {"title": "Mesh HTTP/JSON gateway", "version": "v1",
                 "description": "REST routes of the mesh's services, transcoded to gRPC "
                                "(google.api.http rules). Send `Authorization: Bearer "
                                "<token>` when the nodes require authentication."},
        "tags": [{"name": name, "description": text} for name, text in sorted(tags.items())],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def docs_page(doc: dict[str, Any]) -> str:
    """A self-contained HTML page listing the document's routes (no scripts, no CDN)."""
    rows = []
    for path, operations in doc["paths"].items():
        for verb, op in operations.items():
            params = ", ".join(f"{p['name']} ({p['in']})" for p in op.get("parameters", []))
            rows.append(
                f"<tr><td><code>{verb.upper()}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(op['summary'])}</td>"
                f"<td>{html.escape(params)}</td><td><code>{html.escape(op['tags'][0])}"
                "</code></td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Mesh gateway</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.3em .6em;"
            "border-bottom:1px solid #ddd;text-align:left;vertical-align:top}</style>"
            "</head><body><h1>Mesh HTTP/JSON gateway</h1><p>The machine-readable "
            "document: <a href='/openapi.json'>/openapi.json</a>. Errors are "
            "google.rpc.Status JSON; streams are Server-Sent Events.</p><table><tr>"
            "<th>method</th><th>path</th><th>what</th><th>parameters</th><th>service</th>"
            "</tr>" + "".join(rows) + "</table></body></html>")
