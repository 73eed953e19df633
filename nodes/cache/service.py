"""The gRPC face of the cache: validation, routing to the slot's group, error mapping.

Each request is served by the store of the group that owns its key's slot, on
the group's primary; a write is answered once its changes are committed (held
by every in-sync replica), or at once with ``--cache-replication async``.
Requests for slots led elsewhere are redirected or forwarded (nodes/forwarding.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import ClassVar, TypeAlias, cast

import grpc
from google.protobuf import timestamp_pb2

from common import heartbeat as hb
from common.clock import SECOND, SYSTEM_CLOCK, Clock
from common.errors import invalid_argument
from common.metrics import Snapshot, one
from common.slots import slot_for
from common.tasks import together
from common.tenancy import scoped
from mesh.cache.v1 import cache_pb2 as pb
from mesh.cache.v1 import cache_pb2_grpc as pb_grpc
from nodes.cache import validation as v
from nodes.cache.budget import Budget
from nodes.cache.machine import CACHE, CacheMachine
from nodes.cache.model import EXPIRE_AT, VALUE, VERSION
from nodes.cache.store import (
    CacheStore,
    Entry,
)
from nodes.cache.watch import WatchHub
from nodes.config import CacheLimits, NodeConfig
from nodes.forwarding import Forwarder, wrong_owner
from nodes.replication.group import Group, barriers
from nodes.replication.journal import Journal
from nodes.replication.machine import ServiceKind
from nodes.replication.manager import Redirect, Replication
from nodes.routing import Routed, routed

log = logging.getLogger(__name__)

Ctx: TypeAlias = grpc.aio.ServicerContext

_EXPIRE_BATCH = 1000
"""Most keys one tick expires in a group before requests get their turn."""
_RESULT_BYTES = 48
"""Bytes an MGet result takes in the answer besides its value, at most: its own
framing, ``found``, the value's tag and length, the version and an expiry."""
_ANSWER_BYTES = 16
"""Bytes an MGet answer takes besides its results (``truncated``), with room to spare."""
_NOT_FOUND = pb.GetResponse()
_POLICIES = {
    "lru": pb.EVICTION_POLICY_LRU,
    "lfu": pb.EVICTION_POLICY_LFU,
    "volatile-ttl": pb.EVICTION_POLICY_VOLATILE_TTL,
    "noeviction": pb.EVICTION_POLICY_NOEVICTION,
}


def _timestamp(at_ns: int) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(at_ns)
    return timestamp


def _found(entry: Entry) -> pb.GetResponse:
    response = pb.GetResponse()
    _found_into(response, entry)
    return response


def _found_into(response: pb.GetResponse, entry: Entry) -> None:
    """Write a found entry into ``response`` (an MGet answer's own result, say)."""
    response.found = True
    response.value = entry[VALUE]
    response.version = entry[VERSION]
    if entry[EXPIRE_AT] is not None:
        response.expire_time.FromNanoseconds(entry[EXPIRE_AT])


class CacheService(Routed, pb_grpc.CacheServiceServicer):
    """CacheService over one store per replica group, within one node-wide budget."""

    name: ClassVar[str] = "cache"
    kind: ClassVar[ServiceKind] = CACHE
    durable: ClassVar[bool] = False
    descriptor = pb.DESCRIPTOR.services_by_name["CacheService"]
    tick_interval_ns = SECOND  # expiry sweeps: sooner when a key is due (see `tick`)

    def __init__(self, limits: CacheLimits, *, sync_replication: bool = True,
                 clock: Clock = SYSTEM_CLOCK, max_message_bytes: int = 32 << 20) -> None:
        """``max_message_bytes``: the node's message limit (an MGet answer stays within it)."""
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self.budget = Budget(limits.max_entries, limits.max_bytes)
        self.budget.donors = self._primary_stores
        self.watches = WatchHub()
        self._sync = sync_replication
        self._replication: Replication | None = None

    @classmethod
    def create(cls, config: NodeConfig, journal: Journal | None,
               clock: Clock = SYSTEM_CLOCK) -> CacheService:
        return cls(config.cache, sync_replication=config.cache.replication == "sync",
                   clock=clock, max_message_bytes=config.max_message_bytes)

    def machine(self, group: Group) -> CacheMachine:
        """The cache's state machine for a group (the replication layer's factory)."""
        return CacheMachine(group, self.budget, self.limits.eviction_policy,
                            self.watches.publish, self.clock)

    # -- lifecycle ---------------------------------------------------------

    def start(self, replication: Replication, forwarder: Forwarder) -> None:
        self._replication = replication
        self.start_routing(forwarder)
        replication.on_lost.append(self._lost_groups)

    async def close(self) -> None:
        """End every Watch stream."""
        self.watches.close_all()

    def tick(self, group: Group, now_ns: int) -> int | None:
        # Expired keys are never returned (reads check), but they still hold
        # memory and watchers expect an EXPIRE event: the primary sweeps them,
        # and each expiry is a replicated change like any write. A thousand at a
        # time, then requests get their turn (the ticker comes back at once).
        store = _store(group)
        if store.expire_due(_EXPIRE_BATCH) >= _EXPIRE_BATCH:
            return now_ns
        return store.next_expiry()

    def metrics(self, replication: Replication) -> Snapshot:
        """Figures of the groups this node leads, like Stats: they restart from the
        new primary's when a group moves."""
        stats = [cast(CacheMachine, m).store.stats() for m in replication.led(CACHE)]
        return Snapshot(
            gauges={
                "mesh_cache_entries": ("Live cache keys in led groups",
                                       one(sum(s.entries for s in stats))),
                "mesh_cache_bytes": ("Bytes of live cache keys in led groups",
                                     one(sum(s.bytes for s in stats))),
            },
            counters={f"mesh_cache_{name}": (f"Cache {name} in led groups",
                                             one(sum(getattr(s, name) for s in stats)))
                      for name in ("hits", "misses", "evictions", "expirations")},
        )

    def _lost_groups(self, group_ids: set[int]) -> None:
        """End the watches that relied on groups this node no longer leads: their
        keys now change elsewhere, and the client re-opens them at the new owner."""
        table = self._replication.table if self._replication is not None else None

        def group_of(key: str) -> int | None:
            group = table.group_of_slot(slot_for(key)) if table is not None else None
            return group.group_id if group is not None else None

        self.watches.end_for_groups(group_ids, group_of)

    def _primary_stores(self) -> list[CacheStore]:
        if self._replication is None:
            return []
        return [_store(g) for g in self._replication.groups.values() if g.writable]

    async def _commit(self, group: Group, seq: int | None = None) -> None:
        """Wait (in sync mode) until a write's commands are committed. A store
        operation proposes its changes at once, so right after it (no await in
        between) the group's last command is its last proposal; a write that
        changed nothing (a Delete of a missing key) waits as well, for the
        writes it may have seen. ``seq``: the last command, noted earlier."""
        if self._sync:
            await group.wait_committed(group.log.last_seq if seq is None else seq)

    # -- RPCs --------------------------------------------------------------

    @routed("key")
    async def Get(self, request: pb.GetRequest, context: Ctx, group: Group) -> pb.GetResponse:
        key = request.key
        v.check_key(key)
        if request.consistency not in (pb.READ_CONSISTENCY_UNSPECIFIED,
                                       pb.READ_CONSISTENCY_LINEARIZABLE):
            raise invalid_argument("consistency", "unknown read consistency")
        linearizable = request.consistency == pb.READ_CONSISTENCY_LINEARIZABLE
        if linearizable:
            await group.barrier(slot_for(key))
        entry = _store(group).get(scoped(key))
        if linearizable:  # what was read may be applied here but not yet committed
            await group.wait_committed(group.log.last_seq)
        return pb.GetResponse() if entry is None else _found(entry)

    @routed("key")
    async def Set(self, request: pb.SetRequest, context: Ctx, group: Group) -> pb.SetResponse:
        v.check_key(request.key)
        v.check_value(request.value, self.limits.max_value_bytes)
        ttl = v.ttl_ns(request.HasField("ttl"), request.ttl)
        if request.only_if_absent and request.only_if_version:
            raise invalid_argument("only_if_version", "cannot be combined with only_if_absent")
        entry = _store(group).set(
            scoped(request.key), request.value, ttl=ttl or None,
            only_if_absent=request.only_if_absent,
            only_if_version=request.only_if_version,
        )
        await self._commit(group)
        if entry[EXPIRE_AT] is None:
            return pb.SetResponse(version=entry[VERSION])
        return pb.SetResponse(version=entry[VERSION], expire_time=_timestamp(entry[EXPIRE_AT]))

    @routed("key")
    async def Delete(self, request: pb.DeleteRequest, context: Ctx,
                     group: Group) -> pb.DeleteResponse:
        v.check_key(request.key)
        deleted = _store(group).delete(
            scoped(request.key), only_if_version=request.only_if_version)
        await self._commit(group)
        return pb.DeleteResponse(deleted=deleted)

    async def MGet(self, request: pb.MGetRequest, context: Ctx) -> pb.MGetResponse:
        keys = request.keys
        v.check_batch(keys, "keys")
        for i, key in enumerate(keys):
            v.check_key(key, f"keys[{i}]")
        consistency = request.consistency
        if consistency not in (pb.READ_CONSISTENCY_UNSPECIFIED,
                               pb.READ_CONSISTENCY_LINEARIZABLE):
            raise invalid_argument("consistency", "unknown read consistency")
        linearizable = consistency == pb.READ_CONSISTENCY_LINEARIZABLE
        room = self._answer_room(request.max_answer_bytes)
        local, remote = self.split(keys, context)
        if linearizable:
            await barriers((group, slot_for(keys[indexes[0]]))
                           for group, indexes in local.values())
        answers: list[Entry | pb.GetResponse | None] = [None] * len(keys)  # None: unanswered
        read_at: list[tuple[Group, int]] = []
        for group, indexes in local.values():
            get = _store(group).get
            for i in indexes:
                answers[i] = get(scoped(keys[i])) or _NOT_FOUND
            read_at.append((group, group.log.last_seq))

        async def ask(target: Redirect, indexes: list[int]) -> None:
            share = pb.MGetRequest(keys=[keys[i] for i in indexes],
                                   max_answer_bytes=max(room, 1), consistency=consistency)
            answer = await self.forward(target, "MGet", share, context)
            if answer.consistency != consistency:
                # The owner predates MGet's consistency (a rolling upgrade): ask
                # it key by key, as Get has always honoured it.
                answer = pb.MGetResponse(results=await asyncio.gather(*(
                    self.forward(target, "Get", pb.GetRequest(
                        key=key, consistency=consistency), context)
                    for key in share.keys)))
            # A truncated answer holds a prefix of the share.
            for i, result in zip(indexes, answer.results, strict=False):
                answers[i] = result

        # The owners are asked at once: a caller that does not route by itself
        # (grpcurl, a plain stub) sends keys of every node, and one after
        # another its wait grew with the cluster.
        await together(ask(target, indexes) for target, indexes in remote.values())
        if linearizable:  # what was read may be applied here but not yet committed
            for group, seq in read_at:
                await group.wait_committed(seq)
        # The results that fit, in key order: values are only copied into the
        # answer once they are known to fit in it, and an entry read here is
        # written into the answer's own result (a GetResponse built first would
        # be copied again: twice the work for a 100-key answer).
        response = pb.MGetResponse(consistency=consistency)
        results = response.results
        for answer in answers:
            if answer is None:
                break  # a forwarded share stopped short: the caller asks again from here
            size = _RESULT_BYTES + (answer.ByteSize() if isinstance(answer, pb.GetResponse)
                                    else len(answer[VALUE]))
            if size > room and results:
                break
            room -= size
            if isinstance(answer, pb.GetResponse):  # a forwarded share's, or not found
                results.append(answer)
            else:
                _found_into(results.add(), answer)
        response.truncated = len(results) < len(keys)
        return response

    def _answer_room(self, requested: int) -> int:
        """Bytes an MGet answer's results may take: within the caller's limit and
        this node's (the answer's own fields aside)."""
        limit = self.max_message_bytes
        return (min(requested, limit) if requested else limit) - _ANSWER_BYTES

    async def MSet(self, request: pb.MSetRequest, context: Ctx) -> pb.MSetResponse:
        entries = request.entries
        v.check_batch(entries, "entries")
        items: list[tuple[str, bytes, int | None]] = []
        for i, e in enumerate(entries):
            v.check_key(e.key, f"entries[{i}].key")
            v.check_value(e.value, self.limits.max_value_bytes, f"entries[{i}].value")
            ttl = v.ttl_ns(e.HasField("ttl"), e.ttl, f"entries[{i}].ttl")
            items.append((e.key, e.value, ttl or None))
        local, remote = self.split([item[0] for item in items], context)
        versions = [0] * len(items)
        written: list[tuple[Group, int]] = []
        # Atomic per group: each group's share is one store operation.
        for group, indexes in local.values():
            share = _store(group).mset(
                [(scoped(items[i][0]), *items[i][1:]) for i in indexes])
            written.append((group, group.log.last_seq))
            for i, version in zip(indexes, share, strict=True):
                versions[i] = version

        async def write(target: Redirect, indexes: list[int]) -> None:
            forwarded = pb.MSetRequest(entries=[entries[i] for i in indexes])
            answer = await self.forward(target, "MSet", forwarded, context)
            for i, version in zip(indexes, answer.versions, strict=True):
                versions[i] = version

        await together(write(target, indexes) for target, indexes in remote.values())
        for group, seq in written:
            await self._commit(group, seq)
        return pb.MSetResponse(versions=versions)

    @routed("key")
    async def Incr(self, request: pb.IncrRequest, context: Ctx,
                   group: Group) -> pb.IncrResponse:
        v.check_key(request.key)
        ttl = v.ttl_ns(request.HasField("ttl"), request.ttl)
        value, version = _store(group).incr(scoped(request.key), request.delta,
                                             ttl=ttl or None)
        await self._commit(group)
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
        # Heartbeats only when asked for: an older client would read one as a change.
        heartbeat = hb.interval("heartbeat_interval", request.heartbeat_interval,
                                self.limits.heartbeat_interval
                                ) if request.HasField("heartbeat_interval") else 0.0
        # Keys are watched where they are written: on their group's primary. A
        # request for keys led elsewhere is redirected or forwarded as a whole
        # (to the first key's owner); prefixes span groups, so a prefix watch
        # sees the changes of the groups this node leads (the Python client
        # opens one on every primary).
        local, remote = self.split(request.keys, context)
        if remote:
            first, _ = next(iter(remote.values()))
            if local or request.prefixes or len(remote) > 1:
                raise wrong_owner(first)  # one stream cannot span several owners
            async for item in self.forward_stream(first, "Watch", request, context):
                yield item
            return
        async for message in self.watches.stream(map(scoped, request.keys),
                                                 map(scoped, request.prefixes), heartbeat):
            yield message

    async def Stats(self, request: pb.StatsRequest, context: Ctx) -> pb.StatsResponse:
        """Totals over the groups this node leads (what it serves)."""
        stats = [store.stats() for store in self._primary_stores()]
        return pb.StatsResponse(
            entries=sum(s.entries for s in stats), bytes=sum(s.bytes for s in stats),
            max_entries=self.budget.max_entries, max_bytes=self.budget.max_bytes,
            hits=sum(s.hits for s in stats), misses=sum(s.misses for s in stats),
            evictions=sum(s.evictions for s in stats),
            expirations=sum(s.expirations for s in stats),
            eviction_policy=_POLICIES[self.limits.eviction_policy],
            revision=max((s.revision for s in stats), default=0),
            watchers=len(self.watches),
        )


def _store(group: Group) -> CacheStore:
    return cast(CacheMachine, group.machines[CACHE]).store
