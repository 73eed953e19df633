"""The primary's side of one group's locks: decisions, wait queues and expiry timers.

The primary decides everything that needs a clock, randomness or a queue (who
is granted, with which lease id and token, when a lease expires), writes the
decision into a command and proposes it: the group applies it here at once,
exactly as replicas will (`LockMachine.apply`), and the applied lease comes
back as the proposal's result. Expiry is a timer per lease. When a copy
becomes primary it gives every lease a full ttl from that moment (etcd does
the same on a leader change): the old primary's clock is not ours, and a lease
must never end early because of a failover. The clock is the injected `Clock`
(integer nanoseconds).

Whether a lease still runs is judged on the monotonic clock: each lease's end
is kept here as a monotonic instant, set whenever this primary grants, renews
or refreshes it (the wall instant in the command is for clients and replicas).
A wall clock stepped forward (NTP, an operator) would otherwise end every lease
at once while its holder, timing its ttl on its own monotonic clock, still
relies on it, and a second holder could be granted the lock.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from common.clock import Clock, Timer, to_seconds
from common.slots import slot_for
from mesh.lock.v1 import lock_replication_pb2 as lpb
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.config import LockLimits
from nodes.lock import errors
from nodes.lock.table import Lease, LeaseCount, LockTable
from nodes.lock.waiters import Grant, Waiter, WaitQueue

if TYPE_CHECKING:
    from nodes.replication.group import Group, Proposal

__all__ = ["LockPrimary"]

LOCK = rpb.SERVICE_KIND_LOCK


class LockPrimary:
    """Decisions, waiters and timers for the locks of one group this node leads."""

    def __init__(self, group: Group, table: LockTable, limits: LockLimits,
                 count: LeaseCount, clock: Clock) -> None:
        self._group = group
        self.table = table  # the machine's: decisions read it, only `apply` changes it
        self._limits = limits
        self._count = count
        self._clock = clock
        self.queues: dict[str, WaitQueue] = {}
        self._timers: dict[str, Timer] = {}
        # Lease id -> the monotonic instant its lease ends on this primary.
        self._ends: dict[str, int] = {}
        # Leases handed to more than one call (a retry with the grant's request id
        # gets the same lease) -> how many calls have it. See `abandon`.
        self._handed: dict[str, int] = {}
        self.leading = False

    # -- role ----------------------------------------------------------------------

    def lead(self) -> None:
        self.leading = True
        if self.table.size:
            # One command renews every lease (slot 0: it is about the whole
            # group), so the replicas hold the new expiries too.
            self._group.propose(0, LOCK, lpb.LockCommand(renewed=lpb.LeasesRenewed(
                at_ns=self._clock.wall_ns())).SerializeToString())
        for name, lease in self.table.leases():
            self._arm(name, lease)

    def stop(self) -> None:
        self.leading = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._ends.clear()
        self._handed.clear()
        queues, self.queues = self.queues, {}
        for queue in queues.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(errors.primary_lost(self._group.group_id))

    # -- decisions -------------------------------------------------------------------

    def acquire(self, name: str, *, owner: str, permits: int, max_permits: int, ttl_ns: int,
                request_id: str, wait_ns: int, shared: bool = False) -> Grant | Waiter:
        """Grant at once, or queue a waiter (``wait_ns`` > 0), or raise LOCK_TIMEOUT."""
        lock = self.table.get(name)
        queue = self.queues.get(name)
        size = lock.max_permits if lock else queue.max_permits if queue else max_permits
        if size != max_permits:
            raise errors.permits_mismatch(name, size)
        if request_id:
            lease = lock.by_request(request_id) if lock else None
            if lease is not None and self._runs(lease):
                # A retry of a granted Acquire: the same lease.
                self._handed[lease.lease_id] = self._handed.get(lease.lease_id, 1) + 1
                return Grant(lease, self._group.log.last_seq)
            old = queue.by_request(request_id) if queue else None
            if queue is not None and old is not None:
                waiter = self._waiter(owner, permits, ttl_ns, request_id, wait_ns, shared)
                queue.replace(old, waiter)
                if not old.future.done():
                    old.future.set_exception(errors.superseded())
                return waiter
        if self._count.total >= self._limits.max_leases:
            raise errors.too_many_leases(self._limits.max_leases)
        if not queue and (lock is None or lock.admits(permits, shared)):
            return self._grant(name, max_permits, owner, permits, ttl_ns, request_id, shared)
        if wait_ns <= 0:
            raise errors.lock_timeout(name, self.table.token_bound(name), len(queue or ()))
        if queue is None:
            queue = self.queues[name] = WaitQueue(max_permits)
        if len(queue) >= self._limits.max_waiters:
            raise errors.too_many_waiters(name, self._limits.max_waiters)
        waiter = self._waiter(owner, permits, ttl_ns, request_id, wait_ns, shared)
        queue.push(waiter)
        return waiter

    def _waiter(self, owner: str, permits: int, ttl_ns: int, request_id: str, wait_ns: int,
                shared: bool) -> Waiter:
        now = self._clock.wall_ns()
        return Waiter(owner, permits, ttl_ns, request_id, since_ns=now,
                      give_up_ns=now + wait_ns, shared=shared)

    def leave(self, name: str, waiter: Waiter) -> None:
        """A waiter gave up (timeout or cancelled call)."""
        queue = self.queues.get(name)
        if queue is not None and queue.remove(waiter):
            self._serve(name)  # it may have been the head holding back smaller requests

    def release(self, name: str, lease_id: str) -> int:
        """End a lease at its holder's request; returns the command's seq."""
        lease = self.live_lease(name, lease_id)
        return self._end(name, lease, lpb.LEASE_END_RELEASED)

    def abandon(self, name: str, lease: Lease) -> None:
        """A lease was granted to a call that went away before hearing of it.

        Unless another call was handed the same lease too: a client that lost
        its first try sends the request id again, and the retry may be handed
        the lease (and answer with it) before the first try's cancellation
        arrives here. Ending the lease then would leave the client holding a
        lease the primary no longer knows. It ends when every call it was
        handed to went away (or as leases do: released or expired).
        """
        handed = self._handed.get(lease.lease_id, 1) - 1
        if handed > 0:
            self._handed[lease.lease_id] = handed
            return
        self._handed.pop(lease.lease_id, None)
        if self.leading and self.table.lease(name, lease.lease_id) is lease:
            self._end(name, lease, lpb.LEASE_END_ABANDONED)

    def refresh(self, name: str, lease_id: str, ttl_ns: int | None) -> tuple[Lease, int]:
        """Extend a live lease by ``ttl_ns`` (default: its own) from now."""
        lease = self.live_lease(name, lease_id)
        ttl_ns = ttl_ns or lease.ttl_ns
        proposal = self._propose(name, lpb.LockCommand(refresh=lpb.LeaseRefresh(
            name=name, lease_id=lease_id, ttl_seconds=to_seconds(ttl_ns),
            expire_at=to_seconds(self._clock.wall_ns() + ttl_ns))))
        self._arm(name, lease)
        return lease, proposal.seq

    def live_lease(self, name: str, lease_id: str) -> Lease:
        """The lease, if it has not ended or expired (else LOCK_NOT_HELD)."""
        lease = self.table.lease(name, lease_id)
        if lease is not None and not self._runs(lease):
            self._expire(name, lease_id)  # its timer is due but has not run yet
            lease = None
        if lease is None:
            raise errors.not_held(name, lease_id)
        return lease

    def live_leases(self, name: str) -> list[Lease]:
        lock = self.table.get(name)
        if lock is None:
            return []
        return [lease for lease in lock.leases.values() if self._runs(lease)]

    def _grant(self, name: str, max_permits: int, owner: str, permits: int, ttl_ns: int,
               request_id: str, shared: bool) -> Grant:
        now = self._clock.wall_ns()
        # 128 random bits: a uuid4().hex without making the UUID.
        decided = Lease(os.urandom(16).hex(), owner, self.table.next_token(self._group.epoch),
                        permits, ttl_ns, now + ttl_ns, now, request_id, shared)
        proposal = self._propose(name, lpb.LockCommand(grant=lpb.LeaseGrant(
            name=name, max_permits=max_permits, lease=decided.to_record())))
        lease: Lease = proposal.result  # as the command carries it, as replicas hold it
        self._arm(name, lease)
        return Grant(lease, proposal.seq)

    def _end(self, name: str, lease: Lease, why: lpb.LeaseEnd.ValueType) -> int:
        self._handed.pop(lease.lease_id, None)
        self._ends.pop(lease.lease_id, None)
        timer = self._timers.pop(lease.lease_id, None)
        if timer is not None:
            timer.cancel()
        seq = self._propose(name, lpb.LockCommand(end=lpb.LeaseEndCommand(
            name=name, lease_id=lease.lease_id, why=why))).seq
        self._serve(name)
        return seq

    def _serve(self, name: str) -> None:
        """Grant to the queue's head while the permits allow, in order (so a run of
        shared waiters at the head is granted together)."""
        queue = self.queues.get(name)
        if queue is None:
            return
        while (head := queue.head()) is not None:
            lock = self.table.get(name)
            if lock is not None and not lock.admits(head.permits, head.shared):
                break
            queue.remove(head)
            if not head.future.done():
                head.future.set_result(self._grant(
                    name, queue.max_permits, head.owner, head.permits, head.ttl_ns,
                    head.request_id, head.shared))
        if not queue:
            del self.queues[name]

    def _propose(self, name: str, command: lpb.LockCommand) -> Proposal:
        return self._group.propose(slot_for(name), LOCK, command.SerializeToString())

    # -- expiry ------------------------------------------------------------------------

    def _runs(self, lease: Lease) -> bool:
        """Whether ``lease`` has not reached its end (on the monotonic clock)."""
        end = self._ends.get(lease.lease_id)
        if end is None:  # not armed by this primary (not leading): the command's end
            return lease.expire_ns > self._clock.wall_ns()
        return end > self._clock.monotonic_ns()

    def _arm(self, name: str, lease: Lease) -> None:
        """``lease`` was just granted, renewed or refreshed here: it ends one ttl from
        now, as the wall instant this primary just wrote for it says."""
        self._ends[lease.lease_id] = self._clock.monotonic_ns() + lease.ttl_ns
        self._schedule(name, lease.lease_id, lease.ttl_ns)

    def _schedule(self, name: str, lease_id: str, after_ns: int) -> None:
        timer = self._timers.pop(lease_id, None)
        if timer is not None:
            timer.cancel()
        self._timers[lease_id] = self._clock.call_after(
            after_ns, lambda: self._expire(name, lease_id))

    def _expire(self, name: str, lease_id: str) -> None:
        self._timers.pop(lease_id, None)
        lease = self.table.lease(name, lease_id)
        if not self.leading or lease is None:
            return
        left = self._ends.get(lease_id, 0) - self._clock.monotonic_ns()
        if left > 0:  # refreshed meanwhile, or a timer that fired early
            self._schedule(name, lease_id, left)
            return
        self._end(name, lease, lpb.LEASE_END_EXPIRED)
