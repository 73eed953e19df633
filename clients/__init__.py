"""The typed Python client for Mesh.

    async with Mesh(etcd="127.0.0.1:2379") as mesh:
        await mesh.cache.set("greeting", "hello", ttl=60)
        print(await mesh.cache.get("greeting"))
        async with mesh.lock("orders", ttl=10) as lease:
            ...  # pass lease.token to whatever the lock protects
        await mesh.events.append("order-1", NewEvent("OrderPlaced", {"total": 5}))
        async with mesh.events.subscribe(category="order-") as sub:
            async for event in sub: ...
        job_id = await mesh.scheduler.enqueue("mail", "email.send", {"to": "a@example.com"})
        await Worker(mesh, "mail", {"email.send": send}, concurrency=8).run()

``clients.projection.ProjectionRunner`` keeps a sqlite read model in step with
a subscription, exactly once.

``clients.sync.SyncMesh`` offers the same calls without asyncio.
"""

from clients.cache import CacheEntry, NodeStats
from clients.cache_watch import CacheEvent, EventType
from clients.errors import (
    ConflictError,
    DeadlineExceededError,
    DuplicateEventIdError,
    DuplicateJobError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    JobNotFoundError,
    KeyExistsError,
    LeaseLostError,
    LockLostError,
    LockNotHeldError,
    LockTimeoutError,
    MeshError,
    NoNodesError,
    NotFoundError,
    PermissionDeniedError,
    QueueFullError,
    RateLimitedError,
    ResourceExhaustedError,
    ScheduleExistsError,
    StreamDeletedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    VersionMismatchError,
    WatchGapError,
    WrongExpectedVersionError,
)
from clients.event_subscription import Subscription
from clients.event_types import (
    ANY,
    BEGINNING,
    END,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    CaughtUp,
    Checkpoint,
    Expected,
    FellBehind,
    NewEvent,
    ReadPage,
    RecordedEvent,
    Start,
    StreamMetadata,
)
from clients.events import EventsClient
from clients.job_runtime import JobContext, PermanentJobError, RetryJobLater
from clients.job_types import (
    Attempt,
    AttemptOutcome,
    CancelResult,
    ClaimedJob,
    DeadLetterPage,
    EnqueueResult,
    FailResult,
    Job,
    JobBackoff,
    JobState,
    JobTemplate,
    NewJob,
    QueueStats,
    Schedule,
    SchedulePage,
)
from clients.lease import Lease
from clients.lock import HolderInfo, LockClient, LockInfo, WaiterInfo
from clients.mesh import Mesh
from clients.notify import NotifyClient
from clients.notify_subscription import NotifySubscription
from clients.notify_types import ChannelState, InboxItem, Position, Publication
from clients.presence import PresenceEvent, PresenceMember
from clients.projection import ProjectionCheckpoint, ProjectionRunner, SqliteCheckpointStore
from clients.scheduler import PurgeResult, RequeueResult, SchedulerClient
from clients.worker import Worker, WorkerStats

__all__ = [
    "ANY",
    "BEGINNING",
    "END",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "Attempt",
    "AttemptOutcome",
    "CacheEntry",
    "CacheEvent",
    "CancelResult",
    "CaughtUp",
    "ChannelState",
    "Checkpoint",
    "ClaimedJob",
    "ConflictError",
    "DeadLetterPage",
    "DeadlineExceededError",
    "DuplicateEventIdError",
    "DuplicateJobError",
    "EnqueueResult",
    "EventType",
    "EventsClient",
    "Expected",
    "FailResult",
    "FailedPreconditionError",
    "FellBehind",
    "HolderInfo",
    "InboxItem",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobBackoff",
    "JobContext",
    "JobNotFoundError",
    "JobState",
    "JobTemplate",
    "KeyExistsError",
    "Lease",
    "LeaseLostError",
    "LockClient",
    "LockInfo",
    "LockLostError",
    "LockNotHeldError",
    "LockTimeoutError",
    "Mesh",
    "MeshError",
    "NewEvent",
    "NewJob",
    "NoNodesError",
    "NodeStats",
    "NotFoundError",
    "NotifyClient",
    "NotifySubscription",
    "PermanentJobError",
    "PermissionDeniedError",
    "Position",
    "PresenceEvent",
    "PresenceMember",
    "ProjectionCheckpoint",
    "ProjectionRunner",
    "Publication",
    "PurgeResult",
    "QueueFullError",
    "QueueStats",
    "RateLimitedError",
    "ReadPage",
    "RecordedEvent",
    "RequeueResult",
    "ResourceExhaustedError",
    "RetryJobLater",
    "Schedule",
    "ScheduleExistsError",
    "SchedulePage",
    "SchedulerClient",
    "SqliteCheckpointStore",
    "Start",
    "StreamDeletedError",
    "StreamMetadata",
    "Subscription",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VersionMismatchError",
    "WaiterInfo",
    "WatchGapError",
    "Worker",
    "WorkerStats",
    "WrongExpectedVersionError",
]
