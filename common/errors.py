"""Error reasons and the helpers that put them on the wire.

Every error a Mesh service returns is a canonical gRPC status with a
``google.rpc.Status`` in the trailers carrying an ``ErrorInfo`` (a stable
UPPER_SNAKE ``reason`` in the ``mesh`` domain) and, for bad input, a
``BadRequest`` listing each offending field. Clients map them back with
``clients.errors``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "mesh"


class Reason(enum.StrEnum):
    """Stable machine-readable error reasons (``ErrorInfo.reason``)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INTERNAL = "INTERNAL"
    """A bug on the node (logged there); the call may or may not have taken effect."""
    KEY_EXISTS = "KEY_EXISTS"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    NOT_AN_INTEGER = "NOT_AN_INTEGER"
    INTEGER_OVERFLOW = "INTEGER_OVERFLOW"
    CACHE_FULL = "CACHE_FULL"
    WATCH_LIMIT = "WATCH_LIMIT"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    WRONG_OWNER = "WRONG_OWNER"
    STALE_EPOCH = "STALE_EPOCH"
    NOT_ENOUGH_REPLICAS = "NOT_ENOUGH_REPLICAS"
    LOCK_NOT_HELD = "LOCK_NOT_HELD"
    LOCK_TIMEOUT = "LOCK_TIMEOUT"
    PERMITS_MISMATCH = "PERMITS_MISMATCH"
    TOO_MANY_WAITERS = "TOO_MANY_WAITERS"
    TOO_MANY_LEASES = "TOO_MANY_LEASES"
    SUPERSEDED = "SUPERSEDED"
    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_INVALID = "TOKEN_INVALID"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    ADMIN_REQUIRED = "ADMIN_REQUIRED"
    LEASE_LOST = "LEASE_LOST"
    DUPLICATE_EVENT_ID = "DUPLICATE_EVENT_ID"
    STREAM_DELETED = "STREAM_DELETED"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    DUPLICATE_JOB = "DUPLICATE_JOB"
    QUEUE_FULL = "QUEUE_FULL"
    SCHEDULE_EXISTS = "SCHEDULE_EXISTS"
    SUBSCRIBER_TOO_SLOW = "SUBSCRIBER_TOO_SLOW"
    """A subscription fell too far behind its channel; resume from the offset given."""
    SAGA_NOT_FOUND = "SAGA_NOT_FOUND"
    SAGA_TYPE_NOT_FOUND = "SAGA_TYPE_NOT_FOUND"
    SAGA_EXISTS = "SAGA_EXISTS"
    SAGA_FINISHED = "SAGA_FINISHED"
    # Cluster map and replication.
    NO_MAP = "NO_MAP"
    GROUP_UNAVAILABLE = "GROUP_UNAVAILABLE"
    NOT_COMMITTED = "NOT_COMMITTED"
    OWNERSHIP_EXPIRED = "OWNERSHIP_EXPIRED"
    TOO_MANY_HOPS = "TOO_MANY_HOPS"
    # Sessions (mesh.session.v1).
    TOO_MANY_CALLS = "TOO_MANY_CALLS"
    UNKNOWN_METHOD = "UNKNOWN_METHOD"
    NOT_A_MEMBER = "NOT_A_MEMBER"
    GROUP_NOT_FOUND = "GROUP_NOT_FOUND"
    # The internal plane.
    PEER_UNAUTHENTICATED = "PEER_UNAUTHENTICATED"
    PEER_NOT_PERMITTED = "PEER_NOT_PERMITTED"
    # Rate limits.
    RATE_LIMITED = "RATE_LIMITED"
    RATE_LIMITER_UNAVAILABLE = "RATE_LIMITER_UNAVAILABLE"
    # Coordinator.
    NOT_LEADER = "NOT_LEADER"
    NODE_NOT_FOUND = "NODE_NOT_FOUND"
    NOT_ENOUGH_NODES = "NOT_ENOUGH_NODES"
    MIGRATION_IN_PROGRESS = "MIGRATION_IN_PROGRESS"


MAX_MESSAGE_CHARS = 512
"""Longest status message sent; longer ones are cut, ending in an ellipsis."""
MAX_DETAIL_CHARS = 200
"""Longest ErrorInfo metadata value or BadRequest field/description sent."""


def capped(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the last being an ellipsis if cut."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


class MeshStatusError(Exception):
    """Raised inside a servicer to end the call with a rich status.

    The server-side error interceptor turns it into the wire status; raising
    (rather than awaiting ``context.abort``) keeps domain code free of gRPC context.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: Reason,
        metadata: Mapping[str, str] | None = None,
        violations: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        # Capped here, once for every error: a message or detail that quotes the
        # caller's input (an id, a key) must not grow the status past the
        # metadata limit (the caller would get RESOURCE_EXHAUSTED instead).
        message = capped(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = {capped(k): capped(v) for k, v in (metadata or {}).items()}
        self.violations = {capped(f): capped(d) for f, d in (violations or {}).items()}
        self.retry_after = retry_after
        """Seconds to wait before retrying (sent as google.rpc.RetryInfo)."""

    def to_status(self) -> grpc.Status:
        details = []
        info = error_details_pb2.ErrorInfo(
            reason=self.reason.value, domain=DOMAIN,
            # Capped again: the last gate, should anything change them after __init__.
            metadata={capped(k): capped(v) for k, v in self.metadata.items()},
        )
        details.append(_pack(info))
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=capped(f), description=capped(d))
                    for f, d in self.violations.items()
                ]
            )
            details.append(_pack(bad))
        if self.retry_after is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(self.retry_after * 1e9))
            details.append(_pack(retry))
        proto = status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=capped(self.message, MAX_MESSAGE_CHARS),
            details=details
        )
        return rpc_status.to_status(proto)


class ServiceError(Exception):
    """A refusal by a service's own rules (a lock not held, a stream deleted, a
    queue full): a value its state and decisions raise without knowing about
    gRPC. The node's edge (`nodes.rpc`) answers it with the status its reason
    stands for (`status_of`), the same way for every service."""

    def __init__(self, message: str, reason: Reason,
                 metadata: Mapping[str, str] | None = None,
                 violations: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = dict(violations or {})
        """Fields of the request at fault (a ``BadRequest`` on the wire)."""

    @property
    def code(self) -> grpc.StatusCode:
        """The status code the edge answers with."""
        return STATUS_CODES[self.reason]


STATUS_CODES: dict[Reason, grpc.StatusCode] = {
    Reason.KEY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.VERSION_MISMATCH: grpc.StatusCode.ABORTED,
    Reason.NOT_AN_INTEGER: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.INTEGER_OVERFLOW: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.CACHE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.WATCH_LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
    Reason.GROUP_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.LOCK_NOT_HELD: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LOCK_TIMEOUT: grpc.StatusCode.ABORTED,
    Reason.PERMITS_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.TOO_MANY_WAITERS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.TOO_MANY_LEASES: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.SUPERSEDED: grpc.StatusCode.ABORTED,
    Reason.LEASE_LOST: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.DUPLICATE_EVENT_ID: grpc.StatusCode.ALREADY_EXISTS,
    Reason.STREAM_DELETED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.JOB_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.DUPLICATE_JOB: grpc.StatusCode.ALREADY_EXISTS,
    Reason.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.SCHEDULE_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.SUBSCRIBER_TOO_SLOW: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.SAGA_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.SAGA_TYPE_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.SAGA_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.SAGA_FINISHED: grpc.StatusCode.FAILED_PRECONDITION,
}
"""The status each reason a service may refuse with is answered with (the
codes the protos document)."""


def status_of(error: ServiceError) -> MeshStatusError:
    """The wire status for a service's refusal."""
    return MeshStatusError(STATUS_CODES[error.reason], error.message, error.reason,
                           error.metadata, error.violations)


def invalid_argument(field: str, description: str) -> MeshStatusError:
    """INVALID_ARGUMENT naming one field, e.g. ``invalid_argument("key", "must not be empty")``."""
    return MeshStatusError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{field}: {description}",
        Reason.INVALID_ARGUMENT,
        metadata={"field": field},
        violations={field: description},
    )


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest
          | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED: code_pb2.UNIMPLEMENTED,
}
