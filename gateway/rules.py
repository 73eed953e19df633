"""HTTP rules: ``google.api.http`` annotations -> routes, and matching a request to one.

A path template (``/v1/streams/{stream}:append``) is literal segments,
variables and an optional ``:verb``. Variables bind one segment (``{key}``,
``{key=*}``) or the rest of the path (``{key=**}``); other forms of the
``HttpRule`` grammar (literals inside a variable, nested field paths) are
refused when the routes are built, so an annotation the gateway cannot serve
fails at start, not at request time.

Matching works on the raw (still percent-encoded) path and decodes each
segment it binds, so a key may hold ``/`` (``%2F``) or ``:`` (``%3A``). A
route with a verb is tried before one without, so ``GET
/v1/locks/orders:validate`` is Validate, not Describe of a lock named
``orders:validate`` (send that name as ``orders%3Avalidate``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor

__all__ = ["Match", "Route", "RouteTable", "Segment", "parse_template", "routes_of"]

_METHODS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True, slots=True)
class Segment:
    """A literal segment, or a variable bound to ``field`` (``rest``: ``**``)."""

    literal: str = ""
    field: str = ""
    rest: bool = False


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str
    template: str
    segments: tuple[Segment, ...]
    verb: str
    body: str
    """``*`` (the whole request), a field name, or empty (no body: query parameters)."""
    method: descriptor.MethodDescriptor
    service: str = field(default="")
    """The service's short name as nodes register it: ``cache``, ``lock``..."""

    @property
    def name(self) -> str:
        """``mesh.cache.v1.CacheService/Get``: the label of metrics and logs."""
        return f"{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def path(self) -> str:
        """The gRPC method path."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def variables(self) -> list[str]:
        """The request fields bound by the path, in order."""
        return [s.field for s in self.segments if s.field]

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The bound variables (decoded) if ``raw_path`` matches, else None."""
        if self.verb:
            suffix = ":" + self.verb
            if not raw_path.endswith(suffix):
                return None
            raw_path = raw_path[: -len(suffix)]
        parts = raw_path.split("/")[1:] if raw_path.startswith("/") else None
        if parts is None:
            return None
        bound: dict[str, str] = {}
        for i, segment in enumerate(self.segments):
            if segment.rest:
                rest = parts[i:]
                if not rest or not all(rest):
                    return None
                bound[segment.field] = "/".join(unquote(p) for p in rest)
                return bound
            if i >= len(parts) or not parts[i]:
                return None
            if segment.field:
                bound[segment.field] = unquote(parts[i])
            elif unquote(parts[i]) != segment.literal:
                return None
        return bound if len(parts) == len(self.segments) else None


def parse_template(template: str) -> tuple[tuple[Segment, ...], str]:
    """``/v1/streams/{stream}:append`` -> (segments, verb); ValueError if unsupported."""
    if not template.startswith("/"):
        raise ValueError(f"{template!r}: a path template starts with '/'")
    body, verb = template, ""
    last = template.rsplit("/", 1)[-1]
    if ":" in last and "}" not in last.rsplit(":", 1)[-1]:
        body, verb = template.rsplit(":", 1)
    segments: list[Segment] = []
    for i, part in enumerate(body[1:].split("/")):
        if part.startswith("{") and part.endswith("}"):
            name, _, pattern = part[1:-1].partition("=")
            if not name.isidentifier():
                raise ValueError(f"{template!r}: only top-level fields may be path variables")
            if pattern not in ("", "*", "**"):
                raise ValueError(f"{template!r}: variable pattern {pattern!r} is not supported")
            segments.append(Segment(field=name, rest=pattern == "**"))
        elif not part or "{" in part or "}" in part or part in ("*", "**"):
            raise ValueError(f"{template!r}: segment {i + 1} ({part!r}) is not supported")
        else:
            segments.append(Segment(literal=part))
    if any(s.rest for s in segments[:-1]):
        raise ValueError(f"{template!r}: '**' must be the last segment")
    return tuple(segments), verb


def _bindings(rule: http_pb2.HttpRule) -> Iterable[tuple[str, str, str]]:
    """(http method, template, body) of a rule and its additional bindings."""
    kind = rule.WhichOneof("pattern")
    if kind in _METHODS:
        yield kind.upper(), getattr(rule, kind), rule.body
    elif kind == "custom":
        yield rule.custom.kind.upper(), rule.custom.path, rule.body
    for extra in rule.additional_bindings:
        yield from _bindings(extra)


def routes_of(services: Iterable[descriptor.ServiceDescriptor]) -> list[Route]:
    """Every HTTP binding declared on ``services``' methods (a method without a
    rule is not exposed). ValueError for a rule the gateway cannot serve."""
    routes: list[Route] = []
    for service in services:
        short = service.full_name.split(".")[1]  # mesh.<service>.v1.XService
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for http_method, template, body in _bindings(rule):
                segments, verb = parse_template(template)
                fields = method.input_type.fields_by_name
                for s in segments:
                    if s.field and s.field not in fields:
                        raise ValueError(f"{method.full_name}: {template!r} binds unknown "
                                         f"field {s.field!r}")
                if body not in ("", "*") and body not in fields:
                    raise ValueError(f"{method.full_name}: body {body!r} is not a field")
                routes.append(Route(http_method, template, segments, verb, body, method,
                                    short))
    return routes


@dataclass(frozen=True)
class Match:
    route: Route
    variables: dict[str, str]


class RouteTable:
    """Finds the route of a request: verb routes first, then the rest, in order."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        self._ordered = sorted(self.routes, key=lambda r: not r.verb)

    def find(self, http_method: str, raw_path: str) -> Match | list[str] | None:
        """The match; or, when the path matches only under other HTTP methods,
        those methods (for 405); or None (404)."""
        allowed: list[str] = []
        for route in self._ordered:
            bound = route.match(raw_path)
            if bound is None:
                continue
            if route.http_method == http_method:
                return Match(route, bound)
            allowed.append(route.http_method)
        return sorted(set(allowed)) or None
