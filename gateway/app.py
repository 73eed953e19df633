"""The gateway as a Starlette application.

``/v1/...``: the transcoded routes (one endpoint dispatching on the route
table built from the protos' HTTP rules). ``/healthz``: the process is up.
``/readyz``: 200 once the cluster map is loaded, else 503. ``/metrics``:
Prometheus. ``/openapi.json`` and ``/docs``: the API's description.

Every request is checked at the edge, in this order, before any node hears
of it: a known path and method (404 naming ``path``, 405 with ``Allow``), the
rate limits (429 with ``Retry-After``), the content type (415 unless JSON or
curl's default), the body size
(413 naming ``body``; a ``Content-Length`` over the limit is refused before
reading), then the transcoding (400 naming the field). One access-log line
per request (logger ``gateway.access``) gives method, path (capped, control
characters escaped: `common.logs.loggable`), route, status, duration and
client; never the token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from clients.errors import MeshError
from common.logs import loggable
from common.metrics import LATENCY_BUCKETS
from gateway import sse
from gateway.errors import GatewayError, error_response
from gateway.limits import EdgeLimiter
from gateway.openapi import docs_page
from gateway.positions import CursorError
from gateway.rules import RouteTable
from gateway.transcode import FieldError, request_of, to_json
from gateway.upstream import Call, Upstream
from gateway.websocket import WebSocketSettings, serve_socket, streaming_rpcs

__all__ = ["Gateway", "create_app"]

access = logging.getLogger("gateway.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CURL_DEFAULT = "application/x-www-form-urlencoded"
"""What ``curl -d`` sends by default: its body is taken as JSON all the same."""

ROUTE_KEY = "gateway.route"
"""Scope key under which the API endpoint notes the route's name (logs, metrics)."""


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mesh_gateway_http_requests_total", "HTTP requests answered, by route and status",
            ["route", "method", "status"], registry=self.registry)
        self.duration = Histogram(
            "mesh_gateway_http_request_duration_seconds",
            "Time to answer (streams: until they end), by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.limited = Counter(
            "mesh_gateway_rate_limited_total", "Requests refused by an edge rate limit",
            ["scope"], registry=self.registry)
        self.streams = Gauge("mesh_gateway_sse_streams", "Event streams open",
                             registry=self.registry)
        self.sockets = Gauge("mesh_gateway_websockets", "WebSockets open",
                             registry=self.registry)
        self.map_loaded = Gauge("mesh_gateway_map_loaded",
                                "1 once the cluster map is loaded", registry=self.registry)


@dataclass
class Gateway:
    """What the endpoints need."""

    table: RouteTable
    upstream: Upstream
    limiter: EdgeLimiter
    openapi: dict[str, Any]
    max_body_bytes: int
    sse_keepalive: float
    metrics: GatewayMetrics
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)


def _bearer(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or GatewayError 413 as soon as it passes ``limit`` bytes."""
    too_large = GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT, f"the request body is over {limit} bytes",
        "BODY_TOO_LARGE", violations={"body": f"at most {limit} bytes"}, status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _api(gateway: Gateway, request: Request) -> Response:
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    path = raw_path.decode("ascii", "replace").split("?", 1)[0]
    found = gateway.table.find(request.method, path)
    if found is None:
        raise GatewayError(grpc.StatusCode.NOT_FOUND, f"no route for {request.method} {path}",
                           "ROUTE_NOT_FOUND", violations={"path": "no such route"})
    if isinstance(found, list):
        raise GatewayError(grpc.StatusCode.UNIMPLEMENTED,
                           f"{path} takes {', '.join(found)}, not {request.method}",
                           "METHOD_NOT_ALLOWED", violations={"method": "not allowed here"},
                           headers={"Allow": ", ".join(found)}, status=405)
    route = found.route
    request.scope[ROUTE_KEY] = route.name
    authorization = request.headers.get("authorization", "")
    client = request.client.host if request.client else ""
    try:
        await gateway.limiter.admit(_bearer(authorization), client)
    except GatewayError as exc:
        gateway.metrics.limited.labels(exc.metadata.get("scope", "store")).inc()
        raise
    content_type = request.headers.get("content-type", "").lower()
    if route.body and content_type and "json" not in content_type \
            and not content_type.startswith(_CURL_DEFAULT):
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the body must be JSON, not {content_type}", "UNSUPPORTED_MEDIA_TYPE",
                           violations={"content-type": "use application/json"}, status=415)
    body = await _read_body(request, gateway.max_body_bytes)
    try:
        message = request_of(route, found.variables, request.query_params.multi_items(), body)
    except FieldError as exc:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT",
                           metadata={"field": exc.field},
                           violations={exc.field: exc.description}) from None
    call = Call(route, message, authorization)
    if not route.streaming:
        return JSONResponse(to_json(await gateway.upstream.unary(call)))
    try:
        position = sse.prepare(route.method.full_name, message,
                               request.headers.get("last-event-id", ""))
    except CursorError as exc:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT",
                           violations={"Last-Event-ID": str(exc)}) from None
    stream = await gateway.upstream.stream(call)
    gateway.metrics.streams.inc()
    return StreamingResponse(
        sse.events(position, stream, gateway.sse_keepalive, gateway.metrics.streams.dec),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class AccessLog:
    """One log line and the request metrics per request, when its response is done
    (a stream's when it ends)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get(ROUTE_KEY) or (
                scope["path"] if scope["path"] in _OWN_PATHS else "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.duration.labels(route).observe(elapsed)
            client = scope.get("client") or ("", 0)
            access.info("%s %s %s %d %.1fms %s", scope["method"], loggable(scope["path"]),
                        route, status, elapsed * 1000, client[0])


_OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/live"})


def create_app(gateway: Gateway, cors_origins: tuple[str, ...] = ()) -> Starlette:
    """The ASGI application serving ``gateway``."""

    async def api(request: Request) -> Response:
        try:
            return await _api(gateway, request)
        except MeshError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready = gateway.upstream.ready
        return JSONResponse({"ready": ready, "map_loaded": ready,
                             "map_epoch": gateway.upstream.mesh.epoch},
                            status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        gateway.metrics.map_loaded.set(1 if gateway.upstream.ready else 0)
        return Response(generate_latest(gateway.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSONResponse(gateway.openapi)

    async def docs(request: Request) -> Response:
        return HTMLResponse(page)

    rpcs = streaming_rpcs(gateway.table.routes)

    async def websocket(socket: WebSocket) -> None:
        client = socket.client.host if socket.client else ""

        async def admit(authorization: str) -> None:
            try:
                await gateway.limiter.admit(_bearer(authorization), client)
            except GatewayError as exc:
                gateway.metrics.limited.labels(exc.metadata.get("scope", "store")).inc()
                raise

        gateway.metrics.sockets.inc()
        started = time.perf_counter()
        try:
            await serve_socket(socket, gateway.upstream, rpcs, gateway.websocket, admit)
        finally:
            gateway.metrics.sockets.dec()
            access.info("WS /v1/ws %.1fs %s", time.perf_counter() - started, client)

    async def live(request: Request) -> Response:
        return HTMLResponse(live_page)

    live_page = (Path(__file__).parent / "static" / "live.html").read_text()
    page = docs_page(gateway.openapi)
    middleware = [Middleware(AccessLog, metrics=gateway.metrics)]
    if cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
            allow_headers=["authorization", "content-type", "last-event-id"],
            expose_headers=["retry-after"], max_age=600))
    return Starlette(routes=[
        HttpRoute("/healthz", healthz, methods=["GET"]),
        HttpRoute("/readyz", readyz, methods=["GET"]),
        HttpRoute("/metrics", metrics, methods=["GET"]),
        HttpRoute("/openapi.json", openapi, methods=["GET"]),
        HttpRoute("/docs", docs, methods=["GET"]),
        HttpRoute("/live", live, methods=["GET"]),
        WebSocketRoute("/v1/ws", websocket),
        HttpRoute("/{path:path}", api, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ], middleware=middleware)
