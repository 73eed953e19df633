"""The exceptions the Mesh client raises: one hierarchy, rooted at MeshError.

::

    MeshError
    ├── InvalidArgumentError        bad input; .field_violations names the fields
    ├── ConflictError               a conditional write's condition failed (re-read, retry)
    │   ├── KeyExistsError          only_if_absent, and the key exists
    │   ├── VersionMismatchError    only_if_version, and .current_version differs
    │   │   └── WrongExpectedVersionError  an event append's expected version did not hold
    │   ├── DuplicateEventIdError   some, not all, of an append's event ids are in the stream
    │   ├── DuplicateJobError       strict_unique enqueue, and .job_id holds the unique key
    │   ├── ScheduleExistsError     the queue already has a cron schedule with this id
    │   └── LockTimeoutError        the lock was not acquired in time (nothing held or queued)
    ├── NotFoundError
    │   └── JobNotFoundError        unknown job id, or past its retention
    ├── FailedPreconditionError     the system is not in a state to do this; don't retry as is
    │   ├── LockNotHeldError        the lease is unknown, released or expired: acquire again
    │   ├── StreamDeletedError      the event stream is tombstoned: never usable again
    │   └── LeaseLostError          a job's lease is no longer ours (.state): stop working on it
    ├── ResourceExhaustedError      overload or a limit (cache full, too many watches); back off
    │   └── QueueFullError          the job queue holds the node's maximum of unfinished jobs
    ├── UnavailableError            no node took the call in time; see the class for retries
    │   └── NoNodesError            no node offers the service
    ├── DeadlineExceededError       the call's deadline passed
    ├── WatchGapError               a watch may have missed .missed changes (None: unknown)
    ├── LockLostError               (client-side) a lease was lost, or presumed lost, while held
    ├── UnauthenticatedError        no valid bearer token (missing, malformed, expired, forged)
    ├── PermissionDeniedError       a valid token without the role the call needs (admin)
    ├── UnimplementedError          the node does not implement this call (yet)
    └── InternalError               a bug or an unexpected server failure

Each carries the gRPC ``code``, the server's stable ``reason`` (``ErrorInfo.reason``,
e.g. ``VERSION_MISMATCH``), the ``ErrorInfo.metadata`` and the ``address`` of the
node that answered.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class MeshError(Exception):
    """Base class of every error raised by the Mesh client."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.address = ""
        """The node that answered (host:port), when the error came from one."""
        self.retry_after: float | None = None
        """Seconds the node asked to wait before a retry (google.rpc.RetryInfo)."""


class InvalidArgumentError(MeshError):
    """The request was malformed. ``field_violations`` maps each bad field to why."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = grpc.StatusCode.INVALID_ARGUMENT,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, reason=reason, metadata=metadata)
        self.field_violations: dict[str, str] = dict(field_violations or {})

    @classmethod
    def of_field(cls, field: str, why: str) -> InvalidArgumentError:
        """``field: why``, naming ``field`` as a node names it."""
        return cls(f"{field}: {why}", field_violations={field: why})


class ConflictError(MeshError):
    """A conditional write did not apply: read the current state and decide again."""


class KeyExistsError(ConflictError):
    """``only_if_absent`` was set and the key exists."""


class VersionMismatchError(ConflictError):
    """``only_if_version`` did not match; ``current_version`` is the version now (0 = absent)."""

    @property
    def current_version(self) -> int:
        return int(self.metadata.get("current_version", "0"))


class WrongExpectedVersionError(VersionMismatchError):
    """An event append (or delete) found the stream not in the expected state.

    ``current_version`` is the stream's last version (0 if never written) and
    ``stream_exists`` whether it exists (False: never written, or soft-deleted).
    Re-read the stream, decide again, retry.
    """

    @property
    def stream_exists(self) -> bool:
        return self.metadata.get("stream_exists", "false") == "true"


class DuplicateEventIdError(ConflictError):
    """Some but not all of an append's event ids are already in the stream (or all
    are, in another order). A full, identical replay is not an error: it succeeds
    as a duplicate."""


class LockTimeoutError(ConflictError):
    """Acquire could not get the permits in time; the caller holds nothing and is not queued.

    ``fencing_token`` is the lock's latest token and ``waiters`` its queue length
    (0 when the server did not say).
    """

    @property
    def fencing_token(self) -> int:
        return _int(self.metadata.get("fencing_token", "0"))

    @property
    def waiters(self) -> int:
        return _int(self.metadata.get("waiters", "0"))


class DuplicateJobError(ConflictError):
    """Enqueue with ``strict_unique`` while the unique key is held; ``job_id`` is the
    job holding it."""

    @property
    def job_id(self) -> str:
        return self.metadata.get("job_id", "")


class ScheduleExistsError(ConflictError):
    """CreateSchedule without ``replace`` for an id the queue already has."""


class NotFoundError(MeshError):
    """The named thing does not exist."""


class JobNotFoundError(NotFoundError):
    """No job has this id (never enqueued, or removed after its retention)."""


class SagaNotFoundError(NotFoundError):
    """No saga has this id (never started, or removed after its retention)."""


class SagaTypeNotFoundError(NotFoundError):
    """No saga type (or no such version of it) was registered."""


class SagaExistsError(ConflictError):
    """StartSaga with an id a saga of another type or input already has."""


class FailedPreconditionError(MeshError):
    """The system is not in a state that allows the call; retrying it as is won't help."""


class LockNotHeldError(FailedPreconditionError):
    """Release or Refresh named a lease that is unknown, released or expired."""


class StreamDeletedError(FailedPreconditionError):
    """The event stream was tombstoned: it can never be read or written again."""


class LeaseLostError(FailedPreconditionError):
    """Heartbeat, Complete or Fail presented a lease token that is not the job's
    current one: the lease expired, the job was claimed again or cancelled.
    ``state`` is the job's state now (e.g. ``"PENDING"``; empty if unknown).
    The job belongs to someone else now: stop working on it.

    The worker pool also raises it from ``JobContext.check()`` once it knows, or
    must presume, that the lease is gone."""

    @property
    def state(self) -> str:
        return self.metadata.get("state", "").removeprefix("JOB_STATE_")


class SagaFinishedError(FailedPreconditionError):
    """CancelSaga of a saga that has already ended."""


class ResourceExhaustedError(MeshError):
    """Overload or a configured limit; back off before retrying (``retry_after``
    says for how long when the node knows)."""


class RateLimitedError(ResourceExhaustedError):
    """The tenant (or the method) is over its rate limit; ``retry_after`` says
    when a call will be admitted again."""


class QueueFullError(ResourceExhaustedError):
    """The job queue holds the node's maximum of unfinished jobs."""


class UnavailableError(MeshError):
    """No node could take the call before its deadline: unreachable, shutting down,
    or the slot's group has no serving primary right now (``reason`` says which).

    The client already retried until the deadline every call that was certainly
    not executed (reasons NO_MAP, GROUP_UNAVAILABLE, OWNERSHIP_EXPIRED,
    TOO_MANY_HOPS, WRONG_OWNER) and every call safe to repeat. For the others
    (conditional writes, incr) after a lost connection or NOT_COMMITTED, the
    write may or may not have applied.
    """


class NoNodesError(UnavailableError):
    """No live node offers the service."""


class DeadlineExceededError(MeshError):
    """The call's deadline passed before it completed; it may or may not have applied."""


class WatchGapError(MeshError):
    """Changes may have been missed: a watch stream dropped ``missed`` changes
    because it was read too slowly, or (``missed`` None: unknown) a stream broke and
    the watch was opened again. The watch goes on: re-read what matters, iterate on."""

    def __init__(self, message: str, *, missed: int | None) -> None:
        super().__init__(message)
        self.missed = missed


class LockLostError(MeshError):
    """Raised by the client, not a node: a lease was lost, or must be presumed lost
    (its local deadline passed without a successful refresh), while it was held.
    Work it protected may have overlapped with another holder's."""


class UnauthenticatedError(MeshError):
    """The call carried no valid bearer token (``reason``: TOKEN_MISSING, TOKEN_INVALID or
    TOKEN_EXPIRED). Get a valid token; retrying as is cannot help."""


class PermissionDeniedError(MeshError):
    """The token is valid but lacks the role the call needs (``reason``
    ADMIN_REQUIRED: an admin mutation); retrying as is cannot help."""


class UnimplementedError(MeshError):
    """The node does not implement this call."""


class InternalError(MeshError):
    """An unexpected failure on the server (or a status this client does not know)."""


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: KeyExistsError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    # A CANCELLED that reaches us as an error was not our doing (our own
    # cancellation raises asyncio.CancelledError): the server dropped the call,
    # typically while shutting down. Treated like UNAVAILABLE.
    grpc.StatusCode.CANCELLED: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}
_BY_REASON: dict[str, type[MeshError]] = {
    "VERSION_MISMATCH": VersionMismatchError,
    "KEY_EXISTS": KeyExistsError,
    "LOCK_TIMEOUT": LockTimeoutError,
    "LOCK_NOT_HELD": LockNotHeldError,
    "DUPLICATE_EVENT_ID": DuplicateEventIdError,
    "STREAM_DELETED": StreamDeletedError,
    "JOB_NOT_FOUND": JobNotFoundError,
    "DUPLICATE_JOB": DuplicateJobError,
    "SCHEDULE_EXISTS": ScheduleExistsError,
    "LEASE_LOST": LeaseLostError,
    "QUEUE_FULL": QueueFullError,
    "RATE_LIMITED": RateLimitedError,
    "SAGA_NOT_FOUND": SagaNotFoundError,
    "SAGA_TYPE_NOT_FOUND": SagaTypeNotFoundError,
    "SAGA_EXISTS": SagaExistsError,
    "SAGA_FINISHED": SagaFinishedError,
}


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def from_batch_error(code: int, reason: str, message: str, address: str = "") -> MeshError:
    """The error one request of a batch call got (its ``BatchError``), as the call
    of its own would have raised it."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(status, InternalError)
    result = cls(message or status.name, code=status, reason=reason)
    result.address = address
    return result


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError, address: str = "") -> MeshError:
    """Translate a gRPC error from the node at ``address``, reading the
    google.rpc.Status details if present."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or code.name
    reason = ""
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    retry_after: float | None = None
    for key, value in error.trailing_metadata() or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    result = mesh_error(code, message, reason, metadata, violations, address)
    result.retry_after = retry_after
    return result


def mesh_error(code: grpc.StatusCode, message: str, reason: str = "",
               metadata: Mapping[str, str] | None = None,
               violations: Mapping[str, str] | None = None, address: str = "") -> MeshError:
    """The client error for a status told in parts (a call's, or one item's of a
    batch call)."""
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, InternalError)
    result: MeshError
    if cls is InvalidArgumentError:
        result = InvalidArgumentError(
            message, code=code, reason=reason, metadata=metadata,
            field_violations=dict(violations or {}))
    else:
        result = cls(message, code=code, reason=reason, metadata=metadata)
    result.address = address
    return result
