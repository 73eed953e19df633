"""What a node reports besides RPC counts: groups, replication lag, each service's state.

Summed up on the event loop (`common.metrics.Metrics` calls `node_snapshot`
once a second); cache counters cover the groups this node leads, like the
cache's Stats RPC, so they restart from the new primary's figures when a group
moves.
"""

from __future__ import annotations

from typing import cast

from common.metrics import Labels, Snapshot
from nodes.cache.machine import CACHE, CacheMachine
from nodes.events.service import EventsService
from nodes.lock.machine import LOCK, LockMachine
from nodes.ratelimit import GlobalLimiter, Limiter
from nodes.replication.manager import Replication
from nodes.scheduler.machine import SCHEDULER, SchedulerMachine

__all__ = ["node_snapshot"]


def _one(value: float) -> dict[Labels, float]:
    return {(): value}


def node_snapshot(replication: Replication, events: EventsService | None = None,
                  limiter: Limiter | None = None) -> Snapshot:
    """The node's gauges and counters, now."""
    table = replication.table
    groups = {"primary": 0, "replica": 0}
    slots = {"primary": 0, "replica": 0}
    replicas = {"in_sync": 0, "catching_up": 0}
    lag_commands = lag_seconds = 0.0
    cache = {"hits": 0, "misses": 0, "evictions": 0, "expirations": 0, "entries": 0,
             "bytes": 0}
    leases = waiters = 0
    jobs = {"ready": 0, "delayed": 0, "leased": 0, "dead": 0}
    job_totals = {"succeeded": 0, "failed_attempts": 0, "lease_losses": 0}
    for group_id, group in replication.groups.items():
        role = "primary" if group.is_primary else "replica"
        groups[role] += 1
        view = table.groups.get(group_id) if table is not None else None
        slots[role] += view.slots if view is not None else 0
        if not group.is_primary:
            continue
        for tracker in group.trackers.values():
            progress = tracker.progress()
            replicas["in_sync" if progress.in_sync else "catching_up"] += 1
            lag_commands = max(lag_commands, progress.lag_commands)
            lag_seconds = max(lag_seconds, progress.lag_seconds)
        machine = group.machines.get(CACHE)
        if machine is not None:
            stats = cast(CacheMachine, machine).store.stats()
            for name in cache:
                cache[name] += getattr(stats, name)
        locks = group.machines.get(LOCK)
        if locks is not None:
            lock_machine = cast(LockMachine, locks)
            leases += lock_machine.table.size
            waiters += sum(len(q) for q in lock_machine.queues.values())
        scheduler = group.machines.get(SCHEDULER)
        if scheduler is not None:
            for queue in cast(SchedulerMachine, scheduler).state.queues.values():
                jobs["ready"] += queue.n_ready
                jobs["delayed"] += queue.n_delayed
                jobs["leased"] += len(queue.leased)
                jobs["dead"] += len(queue.dead)
                for name in job_totals:
                    job_totals[name] += getattr(queue.totals, name)
    return Snapshot(
        gauges={
            "mesh_groups": ("Replica groups held, by role",
                            {(("role", r),): float(n) for r, n in groups.items()}),
            "mesh_slots": ("Slots held, by role",
                           {(("role", r),): float(n) for r, n in slots.items()}),
            "mesh_replicas": ("Replicas of the groups this node leads, by state",
                              {(("state", s),): float(n) for s, n in replicas.items()}),
            "mesh_replication_lag_commands": (
                "Commands the furthest-behind replica of a led group still lacks",
                _one(lag_commands)),
            "mesh_replication_lag_seconds": (
                "Age of the oldest command a replica of a led group still lacks",
                _one(lag_seconds)),
            "mesh_map_epoch": ("Cluster map epoch this node follows",
                               _one(float(table.epoch if table is not None else 0))),
            "mesh_cache_entries": ("Live cache keys in led groups", _one(cache["entries"])),
            "mesh_cache_bytes": ("Bytes of live cache keys in led groups", _one(cache["bytes"])),
            "mesh_lock_leases": ("Live lock leases in led groups (holders)", _one(leases)),
            "mesh_lock_waiters": ("Acquire calls queued on this node", _one(waiters)),
            **_events_gauges(events),
            **_limiter_gauges(limiter),
            "mesh_scheduler_jobs": ("Jobs of the queues in led groups, by state (queue depths)",
                                    {(("state", k),): float(n) for k, n in jobs.items()}),
        },
        counters={
            **{f"mesh_cache_{name}": (f"Cache {name} in led groups", _one(cache[name]))
               for name in ("hits", "misses", "evictions", "expirations")},
            **_journal(replication),
            "mesh_replication_snapshots": (
                "Snapshots installed on this node, by kind (full, or in_memory: a copy "
                "restarted from disk kept its durable state and took the rest from the log)",
                {(("kind", k),): float(n) for k, n in replication.snapshots.items()}),
            "mesh_replication_snapshot_bytes": (
                "Bytes of the snapshots installed on this node, by kind",
                {(("kind", k),): float(n) for k, n in replication.snapshot_bytes.items()}),
            **{f"mesh_scheduler_{name}": (f"Scheduler {name.replace('_', ' ')} in led groups",
                                          _one(n)) for name, n in job_totals.items()},
            **_events_counters(events),
            **_limiter_counters(limiter),
        },
    )


def _events_gauges(events: EventsService | None) -> dict[str, tuple[str, dict[Labels, float]]]:
    if events is None:
        return {}
    return {
        "mesh_events_streams": ("Event streams in led groups", _one(events.streams())),
        "mesh_events_subscriptions": ("Open Subscribe streams on this node",
                                      _one(events.subscriptions)),
    }


def _events_counters(events: EventsService | None
                     ) -> dict[str, tuple[str, dict[Labels, float]]]:
    if events is None:
        return {}
    return {"mesh_events_appended": ("Events appended through this node as primary",
                                     _one(events.appended_total))}


def _journal(replication: Replication) -> dict[str, tuple[str, dict[Labels, float]]]:
    journal = replication.journal
    if journal is None:
        return {}
    return {
        "mesh_journal_flushes": ("Transactions (each one fsync) the durable store committed",
                                 _one(journal.flushes)),
        "mesh_journal_writes": ("Writes of durable services made durable, over all flushes",
                                _one(journal.flushed_writes)),
    }


def _limiter_gauges(limiter: Limiter | None) -> dict[str, tuple[str, dict[Labels, float]]]:
    if not isinstance(limiter, GlobalLimiter):
        return {}
    return {"mesh_rate_limiter_failing": (
        "1 while the global rate limiter's Redis is unreachable (see the fail mode)",
        _one(float(limiter.failing)))}


def _limiter_counters(limiter: Limiter | None
                      ) -> dict[str, tuple[str, dict[Labels, float]]]:
    if limiter is None:
        return {}
    return {
        "mesh_rate_limited": ("Calls refused by a rate limit", _one(limiter.limited)),
        "mesh_rate_limiter_store_errors": (
            "Calls that found the global rate limiter's Redis unreachable",
            _one(limiter.store_errors)),
    }
