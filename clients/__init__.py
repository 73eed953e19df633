"""The typed Python client for Mesh.

    async with Mesh(etcd="127.0.0.1:2379") as mesh:
        await mesh.cache.set("greeting", "hello", ttl=60)
        print(await mesh.cache.get("greeting"))
        async with mesh.lock("orders", ttl=10) as lease:
            ...  # pass lease.token to whatever the lock protects

``clients.sync.SyncMesh`` offers the same calls without asyncio.
"""

from clients.cache import CacheEntry, NodeStats
from clients.cache_watch import CacheEvent, EventType
from clients.errors import (
    ConflictError,
    DeadlineExceededError,
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
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    VersionMismatchError,
    WatchGapError,
)
from clients.lease import Lease
from clients.lock import HolderInfo, LockClient, LockInfo, WaiterInfo
from clients.mesh import Mesh

__all__ = [
    "CacheEntry",
    "CacheEvent",
    "ConflictError",
    "DeadlineExceededError",
    "EventType",
    "FailedPreconditionError",
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
    "NoNodesError",
    "NodeStats",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VersionMismatchError",
    "WaiterInfo",
    "WatchGapError",
]
