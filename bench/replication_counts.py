"""Commands per replication message: the replication counters of a cluster's nodes.

Every node counts the Replicate messages it sends its replicas and the commands
they carry (``mesh_replication_messages_sent_total``,
``mesh_replication_commands_sent_total`` on its /metrics, read live). A
workload's `Workload.counters` reads them summed over the cluster's nodes (each
leads some groups) at the start and the end of its measured window, so the
difference is what that window's writes cost in messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from common.localmesh import LocalMesh
from meshctl.status import scrape

MESSAGES = "mesh_replication_messages_sent_total"
COMMANDS = "mesh_replication_commands_sent_total"
SERIES = (MESSAGES, COMMANDS)


async def read(addresses: Sequence[str]) -> dict[str, float]:
    """The replication counters summed over the nodes whose /metrics are ``addresses``."""
    scraped = await asyncio.gather(*(asyncio.to_thread(scrape, a, 5.0) for a in addresses))
    return {name: sum(s.get(name, 0.0) for s in scraped) for name in SERIES}


def reader(local: LocalMesh) -> Callable[[], Awaitable[dict[str, float]]]:
    """`read` of every node of ``local`` (as they are now)."""
    addresses = [node.metrics for node in local.nodes]
    return lambda: read(addresses)


def per_message(counted: dict[str, float]) -> float | None:
    """Commands per replication message in ``counted`` (deltas); None if none was sent."""
    messages = counted.get(MESSAGES, 0.0)
    return counted.get(COMMANDS, 0.0) / messages if messages else None
