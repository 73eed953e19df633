"""What a node reports besides RPC counts: groups, replication lag, snapshots,
the journal and rate limits, plus each service's own figures (`Service.metrics`).

Summed up on the event loop (`common.metrics.Metrics` calls `node_snapshot`
once a second), except the replication stream counters (`SentCollector`): plain
integers the scrape reads as they are, so a reading taken right after a burst
of writes already counts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from common.metrics import Labels, Snapshot, one
from nodes.plugin import Service
from nodes.ratelimit import GlobalLimiter, Limiter
from nodes.replication.manager import Replication
from nodes.replication.sender import SendCounts

__all__ = ["SentCollector", "node_snapshot"]

SENT_SERIES = (
    ("mesh_replication_messages_sent", "messages",
     "Replicate messages this node sent to its replicas (each carries one batch per "
     "group with something to send to that replica)"),
    ("mesh_replication_batches_sent", "batches",
     "Group batches those messages carried (probes and snapshot requests included)"),
    ("mesh_replication_commands_sent", "commands",
     "Commands those batches carried; over mesh_replication_messages_sent_total: "
     "commands per replication message"),
    ("mesh_replication_ack_messages_received", "responses",
     "Acknowledgement messages this node received from its replicas"),
    ("mesh_replication_acks_received", "acks",
     "Group acknowledgements those messages carried"),
)
"""Counter name, `SendCounts` field, help."""


class SentCollector(Collector):
    """The replication stream counters, read live at each scrape (plain integers
    only, bumped on the event loop: reading them from the HTTP thread is safe)."""

    def __init__(self, counts: SendCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, field, text in SENT_SERIES:
            yield CounterMetricFamily(name, text, value=getattr(self._counts, field))

def node_snapshot(replication: Replication, services: Iterable[Service] = (),
                  limiter: Limiter | None = None, silent: Iterable[str] = ()) -> Snapshot:
    """The node's gauges and counters, now (``silent``: the nodes it reports as
    not answering, `nodes.stalls`)."""
    table = replication.table
    groups = {"primary": 0, "replica": 0}
    slots = {"primary": 0, "replica": 0}
    replicas = {"in_sync": 0, "catching_up": 0}
    lag_commands = lag_seconds = 0.0
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
    node = Snapshot(
        gauges={
            "mesh_groups": ("Replica groups held, by role",
                            {(("role", r),): float(n) for r, n in groups.items()}),
            "mesh_slots": ("Slots held, by role",
                           {(("role", r),): float(n) for r, n in slots.items()}),
            "mesh_replicas": ("Replicas of the groups this node leads, by state",
                              {(("state", s),): float(n) for s, n in replicas.items()}),
            "mesh_replication_lag_commands": (
                "Commands the furthest-behind replica of a led group still lacks",
                one(lag_commands)),
            "mesh_replication_lag_seconds": (
                "Age of the oldest command a replica of a led group still lacks",
                one(lag_seconds)),
            "mesh_replica_silent": (
                "1 for each node that stopped answering this one (a replica of groups "
                "led here, or any other node of the map), reported to the coordinator",
                {(("node", n),): 1.0 for n in silent}),
            "mesh_map_epoch": ("Cluster map epoch this node follows",
                               one(float(table.epoch if table is not None else 0))),
            **_limiter_gauges(limiter),
        },
        counters={
            **_journal(replication),
            "mesh_replication_snapshots": (
                "Snapshots installed on this node, by kind (full, or in_memory: a copy "
                "restarted from disk kept its durable state and took the rest from the log)",
                {(("kind", k),): float(n) for k, n in replication.snapshots.items()}),
            "mesh_replication_snapshot_bytes": (
                "Bytes of the snapshots installed on this node, by kind",
                {(("kind", k),): float(n) for k, n in replication.snapshot_bytes.items()}),
            **_limiter_counters(limiter),
        },
    )
    return node.merged(*(service.metrics(replication) for service in services))

def _journal(replication: Replication) -> dict[str, tuple[str, dict[Labels, float]]]:
    journal = replication.journal
    if journal is None:
        return {}
    return {
        "mesh_journal_flushes": ("Transactions (each one fsync) the durable store committed",
                                 one(journal.flushes)),
        "mesh_journal_writes": ("Writes of durable services made durable, over all flushes",
                                one(journal.flushed_writes)),
    }

def _limiter_gauges(limiter: Limiter | None) -> dict[str, tuple[str, dict[Labels, float]]]:
    if not isinstance(limiter, GlobalLimiter):
        return {}
    return {"mesh_rate_limiter_failing": (
        "1 while the global rate limiter's Redis is unreachable (see the fail mode)",
        one(float(limiter.failing)))}

def _limiter_counters(limiter: Limiter | None
                      ) -> dict[str, tuple[str, dict[Labels, float]]]:
    if limiter is None:
        return {}
    return {
        "mesh_rate_limited": ("Calls refused by a rate limit", one(limiter.limited)),
        "mesh_rate_limiter_store_errors": (
            "Calls that found the global rate limiter's Redis unreachable",
            one(limiter.store_errors)),
    }
