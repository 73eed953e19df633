"""The services a node can host: its ``--services`` names and their classes.

Adding a service is a folder in ``nodes/`` with a class implementing
`nodes.plugin.Service`, and one line here.
"""

from __future__ import annotations

from nodes.cache.service import CacheService
from nodes.events.service import EventsService
from nodes.lock.service import LockService
from nodes.plugin import Service
from nodes.scheduler.service import SchedulerService

__all__ = ["SERVICES"]

SERVICES: dict[str, type[Service]] = {
    "cache": CacheService,
    "lock": LockService,
    "events": EventsService,
    "scheduler": SchedulerService,
}
