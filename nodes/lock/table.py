"""A group's replicated lock state: live leases per lock name, and the token watermark.

Every copy of a group (primary and replicas) keeps the same `LockTable`; it
changes only through three decisions the primary ships (grant, end, refresh),
so replaying them in order rebuilds it exactly. It knows nothing of clocks,
waiters or timers: those belong to the primary (`nodes.lock.machine`). Times are
integer nanoseconds; the commands carry them as float seconds (`Lease.of` and
`Lease.to_record` convert).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from common.clock import from_seconds, to_seconds
from mesh.lock.v1 import lock_replication_pb2 as lpb

__all__ = ["EPOCH_SHIFT", "Lease", "LeaseCount", "Lock", "LockTable"]

EPOCH_SHIFT = 32
"""A fencing token is ``epoch << 32 | n``: a new primary (a new epoch) starts above
every token an older one could have granted, even if the group's state were lost."""


@dataclass(slots=True)
class Lease:
    """A live lease, as every copy keeps it."""

    lease_id: str
    owner: str
    token: int
    permits: int
    ttl_ns: int
    expire_ns: int
    """Wall instant."""
    acquire_ns: int
    """Wall instant."""
    request_id: str = ""
    shared: bool = False

    def to_record(self) -> lpb.LeaseRecord:
        return lpb.LeaseRecord(
            lease_id=self.lease_id, owner=self.owner, fencing_token=self.token,
            permits=self.permits, ttl_seconds=to_seconds(self.ttl_ns),
            expire_at=to_seconds(self.expire_ns), acquire_at=to_seconds(self.acquire_ns),
            request_id=self.request_id, shared=self.shared)

    @classmethod
    def of(cls, r: lpb.LeaseRecord) -> Lease:
        return cls(r.lease_id, r.owner, r.fencing_token, r.permits, from_seconds(r.ttl_seconds),
                   from_seconds(r.expire_at), from_seconds(r.acquire_at), r.request_id,
                   r.shared)


@dataclass(slots=True)
class Lock:
    """A lock in use: its size and its leases in grant order."""

    name: str
    max_permits: int
    last_token: int = 0
    leases: dict[str, Lease] = field(default_factory=dict)
    held: int = 0
    """Permits held by exclusive leases."""
    readers: int = 0
    """Shared leases (a read lock's holders)."""

    @property
    def available(self) -> int:
        """Permits an exclusive request could take now."""
        return 0 if self.readers else self.max_permits - self.held

    def admits(self, permits: int, shared: bool) -> bool:
        return self.held == 0 if shared else permits <= self.available

    def account(self, lease: Lease, sign: int) -> None:
        """Count ``lease`` in (``sign`` 1) or out (-1) of the permits held."""
        if lease.shared:
            self.readers += sign
        else:
            self.held += sign * lease.permits

    def by_request(self, request_id: str) -> Lease | None:
        for lease in self.leases.values():
            if lease.request_id == request_id:
                return lease
        return None


class LeaseCount:
    """Live leases in every table of a node (the node's limit is on their number)."""

    def __init__(self) -> None:
        self.total = 0


class LockTable:
    """The locks of one group that have live leases. A lock with none is forgotten
    (names are unbounded); the group's ``last_token`` keeps tokens growing for it."""

    def __init__(self, count: LeaseCount | None = None) -> None:
        self.locks: dict[str, Lock] = {}
        self.last_token = 0
        self.size = 0
        """Live leases in this table."""
        self._count = count or LeaseCount()

    def get(self, name: str) -> Lock | None:
        return self.locks.get(name)

    def lease(self, name: str, lease_id: str) -> Lease | None:
        lock = self.locks.get(name)
        return lock.leases.get(lease_id) if lock is not None else None

    def leases(self) -> Iterator[tuple[str, Lease]]:
        for name, lock in self.locks.items():
            for lease in lock.leases.values():
                yield name, lease

    def next_token(self, epoch: int) -> int:
        """The token for the next grant by a primary of ``epoch``."""
        return max(self.last_token + 1, epoch << EPOCH_SHIFT)

    def token_bound(self, name: str) -> int:
        """At least the latest token granted for ``name``, below the next one."""
        lock = self.locks.get(name)
        return lock.last_token if lock is not None else self.last_token

    # -- the three decisions -------------------------------------------------

    def grant(self, name: str, max_permits: int, lease: Lease) -> None:
        lock = self.locks.get(name)
        if lock is None:
            lock = self.locks[name] = Lock(name, max_permits)
        lock.leases[lease.lease_id] = lease
        lock.account(lease, 1)
        self._resize(1)
        lock.last_token = max(lock.last_token, lease.token)
        self.last_token = max(self.last_token, lease.token)

    def end(self, name: str, lease_id: str) -> Lease | None:
        lock = self.locks.get(name)
        if lock is None:
            return None
        lease = lock.leases.pop(lease_id, None)
        if lease is None:
            return None
        lock.account(lease, -1)
        self._resize(-1)
        if not lock.leases:
            del self.locks[name]
        return lease

    def clear(self) -> None:
        """Forget everything (the group left this node)."""
        self._resize(-self.size)
        self.locks.clear()

    def _resize(self, delta: int) -> None:
        self.size += delta
        self._count.total += delta

    def refresh(self, name: str, lease_id: str, ttl_ns: int, expire_ns: int) -> Lease | None:
        lease = self.lease(name, lease_id)
        if lease is not None:
            lease.ttl_ns = ttl_ns
            lease.expire_ns = expire_ns
        return lease

    # -- replication -----------------------------------------------------------

    def apply(self, command: lpb.LockCommand) -> Lease | None:
        """Apply one decision of the primary; the lease it granted, ended or refreshed."""
        kind = command.WhichOneof("change")
        if kind == "grant":
            g = command.grant
            lease = Lease.of(g.lease)
            self.grant(g.name, g.max_permits, lease)
            return lease
        if kind == "end":
            return self.end(command.end.name, command.end.lease_id)
        if kind == "refresh":
            r = command.refresh
            return self.refresh(r.name, r.lease_id, from_seconds(r.ttl_seconds),
                                from_seconds(r.expire_at))
        if kind == "renewed":
            at = command.renewed.at_ns
            for _, lease in self.leases():
                lease.expire_ns = max(lease.expire_ns, at + lease.ttl_ns)
        return None

    def to_snapshot(self) -> lpb.LockSnapshot:
        snapshot = lpb.LockSnapshot(last_token=self.last_token)
        for lock in self.locks.values():
            snapshot.locks.append(lpb.LockRecord(
                name=lock.name, max_permits=lock.max_permits, last_token=lock.last_token,
                leases=[lease.to_record() for lease in lock.leases.values()]))
        return snapshot

    def load(self, snapshot: lpb.LockSnapshot) -> None:
        self.last_token = max(self.last_token, snapshot.last_token)
        for record in snapshot.locks:
            lock = Lock(record.name, record.max_permits, record.last_token)
            for r in record.leases:
                lease = lock.leases[r.lease_id] = Lease.of(r)
                lock.account(lease, 1)
                self._resize(1)
            if lock.leases:
                self.locks[record.name] = lock
