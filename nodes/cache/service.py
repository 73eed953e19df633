"""The gRPC face of the cache: validation, the store, and error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from common.errors import MeshStatusError, Reason, invalid_argument
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc
from nodes.cache import validation as v
from nodes.cache.store import (
    CacheFullError,
    CacheStore,
    Change,
    ChangeType,
    Entry,
    IntegerOverflowError,
    KeyExistsError,
    NotAnIntegerError,
    VersionMismatchError,
)
from nodes.cache.watch import WatchHub
from nodes.config import CacheLimits

log = logging.getLogger(__name__)

Ctx: TypeAlias = grpc.aio.ServicerContext

_POLICIES = {
    "lru": pb.EVICTION_POLICY_LRU,
    "lfu": pb.EVICTION_POLICY_LFU,
    "volatile-ttl": pb.EVICTION_POLICY_VOLATILE_TTL,
    "noeviction": pb.EVICTION_POLICY_NOEVICTION,
}
_EVENT_TYPES = {
    ChangeType.SET: pb.EVENT_TYPE_SET,
    ChangeType.DELETE: pb.EVENT_TYPE_DELETE,
    ChangeType.EXPIRE: pb.EVENT_TYPE_EXPIRE,
    ChangeType.EVICT: pb.EVENT_TYPE_EVICT,
}


def _timestamp(at: float) -> timestamp_pb2.Timestamp:
    seconds = int(at)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=int((at - seconds) * 1e9))


def _found(entry: Entry) -> pb.GetResponse:
    if entry.expire_at is None:
        return pb.GetResponse(found=True, value=entry.value, version=entry.version)
    return pb.GetResponse(
        found=True, value=entry.value, version=entry.version,
        expire_time=_timestamp(entry.expire_at),
    )


def _store_error(exc: Exception, key_field: str = "key") -> MeshStatusError:
    """Map a store error onto the wire status the proto documents."""
    if isinstance(exc, VersionMismatchError):
        return MeshStatusError(
            grpc.StatusCode.ABORTED,
            f"version mismatch: the key is at version {exc.current_version}",
            Reason.VERSION_MISMATCH,
            metadata={"current_version": str(exc.current_version)},
        )
    if isinstance(exc, KeyExistsError):
        return MeshStatusError(
            grpc.StatusCode.ALREADY_EXISTS, "the key already exists", Reason.KEY_EXISTS
        )
    if isinstance(exc, CacheFullError):
        return MeshStatusError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"cache is full and eviction cannot make room: {exc}",
            Reason.CACHE_FULL,
        )
    if isinstance(exc, NotAnIntegerError):
        return MeshStatusError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{key_field}: the value is not a decimal 64-bit integer",
            Reason.NOT_AN_INTEGER,
            metadata={"field": key_field},
            violations={key_field: "the value is not a decimal 64-bit integer"},
        )
    if isinstance(exc, IntegerOverflowError):
        return MeshStatusError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "delta: the result would overflow 64 bits",
            Reason.INTEGER_OVERFLOW,
            metadata={"field": "delta"},
            violations={"delta": "the result would overflow 64 bits"},
        )
    raise exc


class CacheService(pb_grpc.CacheServiceServicer):
    """CacheService backed by one in-memory store per node."""

    def __init__(self, limits: CacheLimits) -> None:
        self.limits = limits
        self.store = CacheStore(
            max_entries=limits.max_entries,
            max_bytes=limits.max_bytes,
            policy=limits.eviction_policy,
        )
        self.watches = WatchHub()
        self.store.add_listener(self.watches.publish)
        self._expiry_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._expiry_task = asyncio.create_task(self._expire_loop(), name="cache-expiry")

    async def close(self) -> None:
        """End every Watch stream and stop the expiry loop."""
        self.watches.close_all()
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task

    async def _expire_loop(self) -> None:
        # Expired keys are never returned (reads check), but they still hold
        # memory and watchers expect an EXPIRE event: sweep them actively.
        while True:
            removed = self.store.expire_due(1000)
            if removed >= 1000:
                await asyncio.sleep(0)
                continue
            due = self.store.next_expiry()
            delay = 1.0 if due is None else min(max(due - time.time(), 0.005), 1.0)
            await asyncio.sleep(delay)

    # -- RPCs --------------------------------------------------------------

    async def Get(self, request: pb.GetRequest, context: Ctx) -> pb.GetResponse:
        key = request.key
        v.check_key(key)
        entry = self.store.get(key)
        return pb.GetResponse() if entry is None else _found(entry)

    async def Set(self, request: pb.SetRequest, context: Ctx) -> pb.SetResponse:
        v.check_key(request.key)
        v.check_value(request.value, self.limits.max_value_bytes)
        ttl = v.ttl_seconds(request.HasField("ttl"), request.ttl)
        if request.only_if_absent and request.only_if_version:
            raise invalid_argument("only_if_version", "cannot be combined with only_if_absent")
        try:
            entry = self.store.set(
                request.key, request.value, ttl=ttl or None,
                only_if_absent=request.only_if_absent,
                only_if_version=request.only_if_version,
            )
        except (VersionMismatchError, KeyExistsError, CacheFullError) as exc:
            raise _store_error(exc) from None
        if entry.expire_at is None:
            return pb.SetResponse(version=entry.version)
        return pb.SetResponse(version=entry.version, expire_time=_timestamp(entry.expire_at))

    async def Delete(
        self, request: pb.DeleteRequest, context: Ctx
    ) -> pb.DeleteResponse:
        v.check_key(request.key)
        try:
            deleted = self.store.delete(request.key, only_if_version=request.only_if_version)
        except VersionMismatchError as exc:
            raise _store_error(exc) from None
        return pb.DeleteResponse(deleted=deleted)

    async def MGet(self, request: pb.MGetRequest, context: Ctx) -> pb.MGetResponse:
        keys = request.keys
        v.check_batch(keys, "keys")
        for i, key in enumerate(keys):
            v.check_key(key, f"keys[{i}]")
        get = self.store.get
        results = []
        for key in keys:
            entry = get(key)
            results.append(pb.GetResponse() if entry is None else _found(entry))
        return pb.MGetResponse(results=results)

    async def MSet(self, request: pb.MSetRequest, context: Ctx) -> pb.MSetResponse:
        entries = request.entries
        v.check_batch(entries, "entries")
        items: list[tuple[str, bytes, float | None]] = []
        for i, e in enumerate(entries):
            v.check_key(e.key, f"entries[{i}].key")
            v.check_value(e.value, self.limits.max_value_bytes, f"entries[{i}].value")
            ttl = v.ttl_seconds(e.HasField("ttl"), e.ttl, f"entries[{i}].ttl")
            items.append((e.key, e.value, ttl or None))
        try:
            versions = self.store.mset(items)
        except CacheFullError as exc:
            raise _store_error(exc) from None
        return pb.MSetResponse(versions=versions)

    async def Incr(self, request: pb.IncrRequest, context: Ctx) -> pb.IncrResponse:
        v.check_key(request.key)
        ttl = v.ttl_seconds(request.HasField("ttl"), request.ttl)
        try:
            value, version = self.store.incr(request.key, request.delta, ttl=ttl or None)
        except (NotAnIntegerError, IntegerOverflowError, CacheFullError) as exc:
            raise _store_error(exc) from None
        return pb.IncrResponse(value=value, version=version)

    async def Watch(
        self, request: pb.WatchRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchResponse]:
        if not request.keys and not request.prefixes:
            raise invalid_argument("keys", "give at least one key or prefix")
        if len(request.keys) + len(request.prefixes) > v.MAX_WATCH_KEYS:
            raise invalid_argument("keys", f"at most {v.MAX_WATCH_KEYS} keys and prefixes")
        for i, key in enumerate(request.keys):
            v.check_key(key, f"keys[{i}]")
        for i, prefix in enumerate(request.prefixes):
            v.check_key(prefix, f"prefixes[{i}]")
        if len(self.watches) >= self.watches.max_watchers:
            raise MeshStatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this node already serves {self.watches.max_watchers} watches",
                Reason.WATCH_LIMIT,
            )
        watcher = self.watches.subscribe(request.keys, request.prefixes)
        try:
            yield pb.WatchResponse(seq=0, created=True, revision=self.store.revision)
            while True:
                batch = await watcher.next_batch()
                if not batch:
                    break
                for seq, change in batch:
                    yield pb.WatchResponse(
                        seq=seq, event=self._event(change), revision=self.store.revision
                    )
        finally:
            self.watches.unsubscribe(watcher)
        raise MeshStatusError(
            grpc.StatusCode.UNAVAILABLE, "the node is shutting down", Reason.SHUTTING_DOWN
        )

    @staticmethod
    def _event(change: Change) -> pb.WatchEvent:
        event = pb.WatchEvent(
            type=_EVENT_TYPES[change.type], key=change.key, value=change.value,
            revision=change.revision,
        )
        if change.expire_at is not None and change.type is ChangeType.SET:
            event.expire_time.CopyFrom(_timestamp(change.expire_at))
        return event

    async def Stats(self, request: pb.StatsRequest, context: Ctx) -> pb.StatsResponse:
        s = self.store.stats()
        return pb.StatsResponse(
            entries=s.entries, bytes=s.bytes, max_entries=s.max_entries, max_bytes=s.max_bytes,
            hits=s.hits, misses=s.misses, evictions=s.evictions, expirations=s.expirations,
            eviction_policy=_POLICIES[s.policy], revision=s.revision, watchers=len(self.watches),
        )
