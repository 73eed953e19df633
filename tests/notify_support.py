"""Helpers for the notification tests that run against real processes."""

from __future__ import annotations

import asyncio

from clients import Mesh, NotifySubscription
from clients.notify_types import NotifyItem
from common.slots import slot_for


def channels_on_every_node(mesh: Mesh, prefix: str) -> list[str]:
    """One channel name led by each primary."""
    table = mesh.table
    assert table is not None
    names: dict[str, str] = {}
    for i in range(10_000):
        group = table.group_of_slot(slot_for(f"{prefix}{i}"))
        if group is not None and group.primary not in names:
            names[group.primary] = f"{prefix}{i}"
    assert len(names) == len({g.primary for g in table.groups.values()})
    return sorted(names.values())


async def take(sub: NotifySubscription, count: int, timeout: float = 20.0
               ) -> list[NotifyItem]:
    """The next ``count`` items."""
    items: list[NotifyItem] = []

    async def collect() -> None:
        async for item in sub:
            items.append(item)
            if len(items) == count:
                return

    await asyncio.wait_for(collect(), timeout)
    return items
