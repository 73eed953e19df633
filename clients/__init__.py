"""The typed Python client for Mesh.

    async with Mesh(etcd="127.0.0.1:2379") as mesh:
        await mesh.cache.set("greeting", "hello", ttl=60)
        print(await mesh.cache.get("greeting"))
        async with mesh.lock("orders", ttl=10) as lease:
            ...  # pass lease.token to whatever the lock protects
        await mesh.events.append("order-1", NewEvent("OrderPlaced", {"total": 5}))
        async with mesh.events.subscribe(category="order-") as sub:
            async for event in sub: ...

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
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KeyExistsError,
    LockLostError,
    LockNotHeldError,
    LockTimeoutError,
    MeshError,
    NoNodesError,
    NotFoundError,
    ResourceExhaustedError,
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
from clients.lease import Lease
from clients.lock import HolderInfo, LockClient, LockInfo, WaiterInfo
from clients.mesh import Mesh
from clients.projection import ProjectionCheckpoint, ProjectionRunner, SqliteCheckpointStore

__all__ = [
    "ANY",
    "BEGINNING",
    "END",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "CacheEntry",
    "CacheEvent",
    "CaughtUp",
    "Checkpoint",
    "ConflictError",
    "DeadlineExceededError",
    "DuplicateEventIdError",
    "EventType",
    "EventsClient",
    "Expected",
    "FailedPreconditionError",
    "FellBehind",
    "HolderInfo",
    "InternalError",
    "InvalidArgumentError",
    "KeyExistsError",
    "Lease",
    "LockClient",
    "LockInfo",
    "LockLostError",
    "LockNotHeldError",
    "LockTimeoutError",
    "Mesh",
    "MeshError",
    "NewEvent",
    "NoNodesError",
    "NodeStats",
    "NotFoundError",
    "ProjectionCheckpoint",
    "ProjectionRunner",
    "ReadPage",
    "RecordedEvent",
    "ResourceExhaustedError",
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
    "WrongExpectedVersionError",
]
