"""gRPC status -> HTTP: the status code (grpc-gateway's table) and a JSON body
shaped like ``google.rpc.Status``: ``{"code", "message", "details": [...]}``,
each detail an ``Any`` in JSON (``"@type"`` plus the fields of the ErrorInfo,
BadRequest or RetryInfo the node sent). Errors found at the edge (a bad path,
a bad body, a rate limit) get the same shape, reason and field names included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from starlette.responses import JSONResponse

from clients.errors import InvalidArgumentError, MeshError
from common.errors import DOMAIN, MAX_MESSAGE_CHARS, capped

__all__ = ["HTTP_STATUS", "GatewayError", "error_response", "http_status", "status_json"]

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""As grpc-gateway's ``HTTPStatusFromCode``."""


class GatewayError(MeshError):
    """An error found by the gateway itself, before (or instead of) calling a node."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, *,
                 metadata: Mapping[str, str] | None = None,
                 violations: Mapping[str, str] | None = None,
                 retry_after: float | None = None, headers: Mapping[str, str] | None = None,
                 status: int | None = None) -> None:
        """``status``: the HTTP status when the code's own does not fit (405, 413, 415)."""
        super().__init__(message, code=code, reason=reason, metadata=metadata)
        self.status = status
        self.violations = dict(violations or {})
        self.retry_after = retry_after
        self.headers = dict(headers or {})


def http_status(code: grpc.StatusCode | None) -> int:
    return HTTP_STATUS.get(code or grpc.StatusCode.UNAVAILABLE, 500)


def _pack(detail: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def status_json(error: MeshError) -> dict[str, Any]:
    """``error`` as a google.rpc.Status in JSON (proto field names)."""
    code = error.code or grpc.StatusCode.UNAVAILABLE
    details = []
    # Every answer's error passes here (HTTP, SSE, WebSocket), so here it is
    # capped, as a node caps its own: it may quote the caller's input (a path,
    # a parameter's or field's name), which only the HTTP server's own limits
    # bound, and an answer must not echo that back whole.
    if error.reason:
        details.append(_pack(error_details_pb2.ErrorInfo(
            reason=error.reason, domain=DOMAIN,
            metadata={capped(k): capped(v) for k, v in error.metadata.items()})))
    violations = error.violations if isinstance(error, GatewayError) else (
        error.field_violations if isinstance(error, InvalidArgumentError) else {})
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=capped(f), description=capped(d))
            for f, d in violations.items()])))
    if error.retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(_pack(retry))
    status = status_pb2.Status(code=code.value[0], message=capped(error.message, MAX_MESSAGE_CHARS),
                               details=details)
    result: dict[str, Any] = json_format.MessageToDict(
        status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return result


def error_response(error: MeshError) -> JSONResponse:
    """The HTTP answer for ``error``; a Retry-After header when it says when to retry."""
    headers = dict(error.headers) if isinstance(error, GatewayError) else {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    status = error.status if isinstance(error, GatewayError) and error.status else \
        http_status(error.code)
    return JSONResponse(status_json(error), status_code=status, headers=headers)
