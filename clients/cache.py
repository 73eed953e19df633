"""Typed cache calls: ``await mesh.cache.get("k")``."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from clients.cache_watch import CacheWatch
from clients.coalesce import (
    BATCH_BYTES,
    MIN_BUDGET,
    BatchFailed,
    Coalescer,
    SendOne,
    in_batch,
)
from clients.durations import duration
from clients.errors import InternalError, InvalidArgumentError, MeshError, NoNodesError
from clients.requests import build
from clients.retry import Verdict, WrongOwner, classify, with_retries
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clients.cache_pipeline import CachePipeline
    from clients.mesh import Mesh

Value = bytes | str
Item = TypeVar("Item")
Result = TypeVar("Result")
TTL = float | timedelta | None

_BATCH = 1000

# send(address, indexes, budget): one batch call to one node for keys[i] for i in indexes.
Send = Callable[[str, list[int], float], Awaitable[None]]


def _parts(indexes: list[int], groups: Sequence[int], sizes: Sequence[int], limit: int
           ) -> list[list[int]]:
    """One node's MSet entries (``indexes``) in parts of at most ``limit`` bytes,
    a group's entries never split: MSet is atomic per group."""
    by_group: dict[int, list[int]] = defaultdict(list)
    for i in indexes:
        by_group[groups[i]].append(i)
    parts: list[list[int]] = [[]]
    room = limit
    for group in by_group.values():
        size = sum(sizes[i] for i in group)
        if size > room and parts[-1]:
            parts.append([])
            room = limit
        parts[-1].extend(group)
        room -= size
    return parts


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A key's value with its version (for only_if_version) and expiry (epoch seconds)."""

    value: bytes
    version: int
    expire_at: float | None


@dataclass(frozen=True, slots=True)
class NodeStats:
    node: str
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    expirations: int
    eviction_policy: str
    revision: int
    watchers: int


def _bytes(value: Value) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _ttl(ttl: TTL) -> duration_pb2.Duration | None:
    return None if ttl is None else duration(ttl, "ttl")


def _entry(r: pb.GetResponse) -> CacheEntry | None:
    if not r.found:
        return None
    expire = None
    if r.HasField("expire_time"):
        expire = r.expire_time.seconds + r.expire_time.nanos / 1e9
    return CacheEntry(r.value, r.version, expire)


_PRECEDENCE = {Verdict.FINAL: 0, Verdict.REDIRECT: 1, Verdict.UNKNOWN: 2, Verdict.NOT_EXECUTED: 3}


def _decisive(errors: Sequence[BaseException]) -> BaseException:
    """The one error a partly failed batch raises: the one that decides what the retry
    loop does. A bug first, then a final answer, then a refusal from the newest map
    (it may trigger a map read), then the unavailable ones."""

    def rank(e: BaseException) -> tuple[int, int]:
        if not isinstance(e, MeshError):
            return (-1, 0)
        verdict = classify(e)
        epoch = WrongOwner.of(e).epoch if verdict is Verdict.REDIRECT else 0
        return (_PRECEDENCE[verdict], -epoch)

    return min(errors, key=rank)


class CacheClient:
    """The cache, spread over the mesh's nodes. Every call takes ``timeout=`` (seconds)."""

    def __init__(self, mesh: Mesh, *, coalesce: bool = True) -> None:
        self._mesh = mesh
        self.coalesce = coalesce
        """Send concurrent gets for one node as one MGet (see ``clients.coalesce``)."""
        self._reads: Coalescer[str, pb.GetResponse] = Coalescer(
            self._get_one, self._get_many, _BATCH)
        self._linearizable_reads: Coalescer[str, pb.GetResponse] = Coalescer(
            self._get_one_linearizable, self._get_many_linearizable, _BATCH)
        self._writes: Coalescer[pb.MSetEntry, int] = Coalescer(
            self._set_one, self._set_many, _BATCH, key=lambda entry: entry.key,
            size=in_batch, max_bytes=mesh.max_message_bytes - BATCH_BYTES)

    async def _rpc(self, address: str, method: str, request: Any, budget: float) -> Any:
        return await self._mesh.call(pb_grpc.CacheServiceStub, address, method, request, budget)

    async def _call(
        self, key: str, method: str, request: Any, timeout: float | None, retry: bool
    ) -> Any:
        """One unary call to the node that owns ``key``; ``retry``: safe to repeat
        even when a failed try may have applied (see ``clients.retry``)."""

        async def attempt(budget: float, address: str | None) -> Any:
            address = address or self._mesh.route("cache", key).address
            return await self._rpc(address, method, request, budget)

        return await with_retries(self._mesh, attempt, timeout=timeout, safe=retry)

    # -- single keys -------------------------------------------------------

    async def get(self, key: str, *, linearizable: bool = False,
                  timeout: float | None = None) -> bytes | None:
        """The value of ``key``, or None if it is missing or expired. ``linearizable``:
        never stale and never a write not yet committed, for about the cost of a
        replicated write (see ReadConsistency in cache.proto); concurrent ones
        bound for one node share a linearizable MGet, as plain gets share one."""
        r = await self._read(key, linearizable, timeout)
        return r.value if r.found else None

    async def get_entry(self, key: str, *, linearizable: bool = False,
                        timeout: float | None = None) -> CacheEntry | None:
        """The value with its version and expiry, or None."""
        return _entry(await self._read(key, linearizable, timeout))

    async def _read(self, key: str, linearizable: bool, timeout: float | None,
                    coalesce: bool | None = None) -> pb.GetResponse:
        """One key's GetResponse: joined with the other gets for its owner in this
        loop turn when it can be (MGet reads as a plain Get does). ``coalesce``:
        None follows the client's setting (a pipeline always batches)."""
        batch = self.coalesce if coalesce is None else coalesce
        owner = self._owner(key) if batch else None
        if owner is None:
            return await self._get_alone(key, linearizable, timeout)
        if linearizable:  # a linearizable MGet: one no-op per group, not per key
            return await self._coalesced(self._linearizable_reads, owner, key, timeout,
                                         self._get_one_linearizable)
        return await self._coalesced(self._reads, owner, key, timeout, self._get_one)

    def _owner(self, key: str) -> str | None:
        """The address of ``key``'s owner if the map names one, else None: such a
        call goes alone, through the path that waits for the cluster."""
        try:
            target = self._mesh.route("cache", key)
        except NoNodesError:
            return None
        return target.address if target.owner else None

    async def _coalesced(self, coalescer: Coalescer[Item, Result], address: str, item: Item,
                         timeout: float | None, alone: SendOne[Item, Result]) -> Result:
        """``item``'s result through ``coalescer``; ``alone`` if its batch fails."""
        loop = asyncio.get_running_loop()
        budget = self._mesh.timeout if timeout is None else timeout
        deadline = loop.time() + budget
        try:
            return await coalescer.call(address, item, budget)
        except BatchFailed as failed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise failed.cause from None
        # Alone now: the batch's failure may have been another key's (or a
        # moved slot's); this call gets its own retries and its own answer.
        return await alone(address, item, remaining)

    async def _get_alone(self, key: str, linearizable: bool, timeout: float | None
                         ) -> pb.GetResponse:
        r: pb.GetResponse = await self._call(key, "Get", _get(key, linearizable), timeout, True)
        return r

    async def _get_one(self, address: str, key: str, budget: float) -> pb.GetResponse:
        return await self._get_alone(key, False, budget)

    async def _get_one_linearizable(self, address: str, key: str, budget: float
                                    ) -> pb.GetResponse:
        return await self._get_alone(key, True, budget)

    async def _get_many(self, address: str, keys: list[str], budget: float
                        ) -> Sequence[pb.GetResponse]:
        return await self._mget(address, keys, budget)

    async def _get_many_linearizable(self, address: str, keys: list[str], budget: float
                                     ) -> Sequence[pb.GetResponse]:
        return await self._mget(address, keys, budget, linearizable=True)

    async def _mget(self, address: str, keys: Sequence[str], budget: float, *,
                    linearizable: bool = False) -> list[pb.GetResponse]:
        """The node's results for ``keys``, within ``budget`` seconds: in more than one
        MGet when their values are more than one answer may hold (the node
        answers those that fit, and says so)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        results: list[pb.GetResponse] = []
        consistency = _consistency(linearizable)
        while True:
            r = await self._rpc(address, "MGet", pb.MGetRequest(
                keys=keys[len(results):], max_answer_bytes=self._mesh.max_message_bytes,
                consistency=consistency), budget)
            if r.consistency != consistency:
                # A node from before MGet's consistency (a rolling upgrade) read
                # them as it always did: ask it key by key, as Get honours it.
                results.extend(await asyncio.gather(*(
                    self._rpc(address, "Get", _get(key, linearizable), budget)
                    for key in keys[len(results):])))
                return results
            results.extend(r.results)
            if not r.truncated or len(results) >= len(keys):
                return results
            if not r.results:  # never: a node answers at least one key
                raise InternalError(f"{address} answered an MGet with no results",
                                    code=grpc.StatusCode.INTERNAL)
            budget = max(deadline - loop.time(), MIN_BUDGET)

    async def set(
        self, key: str, value: Value, *, ttl: TTL = None, only_if_absent: bool = False,
        only_if_version: int = 0, timeout: float | None = None,
    ) -> int:
        """Write ``key``; returns its new version.

        Raises KeyExistsError / VersionMismatchError when a condition fails.
        """
        return await self._set(key, value, ttl, only_if_absent, only_if_version, timeout,
                               self.coalesce)

    async def _set(self, key: str, value: Value, ttl: TTL, only_if_absent: bool,
                   only_if_version: int, timeout: float | None, coalesce: bool) -> int:
        owner = self._owner(key) if coalesce else None
        if owner is not None and not only_if_absent and not only_if_version:
            entry = pb.MSetEntry(key=key, value=_bytes(value), ttl=_ttl(ttl))
            return await self._coalesced(self._writes, owner, entry, timeout, self._set_one)
        request = build(pb.SetRequest)(
            key=key, value=_bytes(value), ttl=_ttl(ttl),
            only_if_absent=only_if_absent, only_if_version=only_if_version)
        # An unconditional set is idempotent; a conditional one is not (a retry
        # after a lost reply would fail its own condition), so it is not retried.
        retry = not only_if_absent and not only_if_version
        r = await self._call(key, "Set", request, timeout, retry)
        return int(r.version)

    async def _set_one(self, address: str, entry: pb.MSetEntry, budget: float) -> int:
        request = pb.SetRequest(key=entry.key, value=entry.value,
                                ttl=entry.ttl if entry.HasField("ttl") else None)
        r = await self._call(entry.key, "Set", request, budget, True)
        return int(r.version)

    async def _set_many(self, address: str, entries: list[pb.MSetEntry], budget: float
                        ) -> Sequence[int]:
        r = await self._rpc(address, "MSet", pb.MSetRequest(entries=entries), budget)
        return list(r.versions)

    async def delete(
        self, key: str, *, only_if_version: int = 0, timeout: float | None = None
    ) -> bool:
        """Remove ``key``; True if it existed."""
        request = build(pb.DeleteRequest)(key=key, only_if_version=only_if_version)
        r = await self._call(key, "Delete", request, timeout, not only_if_version)
        return bool(r.deleted)

    async def incr(
        self, key: str, delta: int = 1, *, ttl: TTL = None, timeout: float | None = None
    ) -> int:
        """Add ``delta`` to an integer value (created at 0); returns the new value.

        Not retried: a retry after a lost reply would add twice.
        """
        request = build(pb.IncrRequest)(key=key, delta=delta, ttl=_ttl(ttl))
        r = await self._call(key, "Incr", request, timeout, False)
        return int(r.value)

    # -- batches -----------------------------------------------------------

    def _by_node(self, indexes: Iterable[int], keys: Sequence[str]) -> list[tuple[str, list[int]]]:
        """``indexes`` into ``keys`` grouped by owner node, at most _BATCH per group.

        Keys whose slot has no owner in the map (or with no map at all) go
        together to one node, which forwards them or says why it cannot.
        """
        groups: dict[str, list[int]] = defaultdict(list)
        unowned: list[int] = []
        for i in indexes:
            target = self._mesh.route("cache", keys[i])
            if target.owner:
                groups[target.address].append(i)
            else:
                unowned.append(i)
        if unowned:
            groups[self._mesh.any_node("cache").address].extend(unowned)
        return [(address, share[start:start + _BATCH])
                for address, share in groups.items()
                for start in range(0, len(share), _BATCH)]

    async def _batched(self, keys: Sequence[str], send: Send, timeout: float | None) -> None:
        """Call ``send(address, indexes, budget)`` for each node's share of ``keys``, in
        parallel. Shares that fail (node unavailable, not the owner) are grouped
        again by the current owners and re-sent, within the deadline: batch calls
        are safe to repeat. Shares that succeeded are not sent again."""
        pending = list(range(len(keys)))

        async def attempt(budget: float, _address: str | None) -> None:
            nonlocal pending
            shares = self._by_node(pending, keys)
            outcomes = await asyncio.gather(
                *(send(address, share, budget) for address, share in shares),
                return_exceptions=True)
            failed = [(share, e) for (_, share), e in zip(shares, outcomes, strict=True)
                      if isinstance(e, BaseException)]
            pending = sorted(i for share, _ in failed for i in share)
            if failed:
                raise _decisive([e for _, e in failed])

        # An owner named by one slot's refusal says nothing about the other
        # keys: redirects regroup by the (refreshed) map instead.
        await with_retries(self._mesh, attempt, timeout=timeout, safe=True, follow_hints=False)

    async def mget(
        self, keys: Sequence[str], *, linearizable: bool = False,
        timeout: float | None = None,
    ) -> list[bytes | None]:
        """Values for ``keys``, in order (None where missing). Nodes are asked in
        parallel; a node's share whose values are more than one answer holds comes
        in parts. ``linearizable``: each key's value as ``get(linearizable=True)``
        reads it (not one snapshot of all the keys), for one no-op write per
        group instead of one per key."""
        results: list[bytes | None] = [None] * len(keys)

        async def fetch(address: str, indexes: list[int], budget: float) -> None:
            found = await self._mget(address, [keys[i] for i in indexes], budget,
                                     linearizable=linearizable)
            for i, item in zip(indexes, found, strict=True):
                results[i] = item.value if item.found else None

        await self._batched(keys, fetch, timeout)
        return results

    async def mset(
        self, items: Mapping[str, Value] | Sequence[tuple[str, Value]], *, ttl: TTL = None,
        timeout: float | None = None,
    ) -> list[int]:
        """Write many keys; returns their versions in order.

        Atomic per group (the keys of some slots, led by one node: all of a
        group's keys or none), not across groups. A node's share larger than a
        message (32 MiB) goes as several MSets, each holding whole groups;
        one group's keys over 32 MiB in one call are refused (InvalidArgumentError).
        """
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        keys = [k for k, _ in pairs]
        versions = [0] * len(pairs)
        expiry = _ttl(ttl)
        entries = [pb.MSetEntry(key=key, value=_bytes(value), ttl=expiry)
                   for key, value in pairs]
        sizes = [in_batch(entry) for entry in entries]
        limit = self._mesh.max_message_bytes - BATCH_BYTES
        groups = self._groups(keys, sizes, limit) if sum(sizes) > limit else None

        async def store(address: str, indexes: list[int], budget: float) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + budget
            parts = [indexes] if groups is None else _parts(indexes, groups, sizes, limit)
            for part in parts:
                r = await self._rpc(address, "MSet", pb.MSetRequest(
                    entries=[entries[i] for i in part]), budget)
                for i, version in zip(part, r.versions, strict=True):
                    versions[i] = version
                budget = max(deadline - loop.time(), MIN_BUDGET)

        await self._batched(keys, store, timeout)
        return versions

    def _groups(self, keys: Sequence[str], sizes: Sequence[int], limit: int) -> list[int]:
        """Each key's group (as the map has it; 0: no map), once no group's keys
        are more than ``limit`` bytes (else InvalidArgumentError, before anything is sent)."""
        groups = [self._group(key) for key in keys]
        totals: dict[int, int] = defaultdict(int)
        for group, size in zip(groups, sizes, strict=True):
            totals[group] += size
        group, size = max(totals.items(), key=lambda item: item[1])
        if size > limit:
            raise InvalidArgumentError(
                f"items: {size:,} bytes for keys written together atomically (one group's"
                f"{'' if group else ', or every key while no map is known'}), more than one "
                f"message holds ({limit:,}); write them in more than one call",
                field_violations={"items": "more than one message for one group"})
        return groups

    def _group(self, key: str) -> int:
        """The group of ``key``'s slot as the map has it (0: no map)."""
        try:
            return self._mesh.route("cache", key).group_id
        except NoNodesError:
            return 0

    def pipeline(self) -> CachePipeline:
        """Commands queued and sent together, batched by owner node, like redis-py's
        pipeline: ``p = mesh.cache.pipeline(); p.get("a"); p.set("b", "1");
        a, version = await p.execute()``. See `clients.cache_pipeline`."""
        from clients.cache_pipeline import CachePipeline

        return CachePipeline(self)

    # -- watch and stats ---------------------------------------------------

    def watch(
        self, keys: Sequence[str] = (), prefixes: Sequence[str] = (), *,
        timeout: float | None = None, heartbeat_interval: float | None = None,
    ) -> CacheWatch:
        """Follow changes: ``async with mesh.cache.watch(prefixes=["user:"]) as w:
        async for event in w: ...``. Entering returns once every node has confirmed
        the watch, so no later change is missed; ``timeout`` bounds that. A stream
        that breaks (or whose node is silent for 3 heartbeat intervals;
        ``heartbeat_interval`` asks for one instead of the nodes' setting) is opened
        again, and iterating raises WatchGapError once it is: catch it, re-read what
        matters, and iterate on."""
        return CacheWatch(self._mesh, list(keys), list(prefixes), timeout, heartbeat_interval)

    async def stats(self, *, timeout: float | None = None) -> list[NodeStats]:
        """Per-node cache counters."""
        budget = self._mesh.timeout if timeout is None else timeout

        async def one(node: str, address: str) -> NodeStats:
            r = await self._rpc(address, "Stats", pb.StatsRequest(), budget)
            policy = pb.EvictionPolicy.Name(r.eviction_policy)
            return NodeStats(node, r.entries, r.bytes, r.max_entries, r.max_bytes, r.hits,
                             r.misses, r.evictions, r.expirations,
                             policy.removeprefix("EVICTION_POLICY_").lower(), r.revision,
                             r.watchers)

        nodes = self._mesh.nodes("cache")
        return list(await asyncio.gather(*(one(n.node_id, n.address) for n in nodes)))


def _consistency(linearizable: bool) -> pb.ReadConsistency.ValueType:
    return (pb.READ_CONSISTENCY_LINEARIZABLE if linearizable
            else pb.READ_CONSISTENCY_UNSPECIFIED)


def _get(key: str, linearizable: bool) -> pb.GetRequest:
    return pb.GetRequest(key=key, consistency=_consistency(linearizable))
