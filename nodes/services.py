"""The services a node can host: its ``--services`` names and their classes.

Adding a service is a folder in ``nodes/`` with a class implementing
`nodes.plugin.Service`, and one line here; a service kept elsewhere is named
with ``--plugins module:Class`` instead.
"""

from __future__ import annotations

import importlib

from nodes.cache.service import CacheService
from nodes.events.service import EventsService
from nodes.lock.service import LockService
from nodes.notify.service import NotifyService
from nodes.plugin import Service
from nodes.saga.service import SagaService
from nodes.scheduler.service import SchedulerService

__all__ = ["SERVICES", "registry"]

SERVICES: dict[str, type[Service]] = {
    "cache": CacheService,
    "lock": LockService,
    "events": EventsService,
    "scheduler": SchedulerService,
    "notify": NotifyService,
    "saga": SagaService,
}


def registry(plugins: tuple[str, ...] = ()) -> dict[str, type[Service]]:
    """`SERVICES` and the classes ``plugins`` name (``module:Class``); ValueError
    names a plugin that cannot be loaded."""
    found = dict(SERVICES)
    for spec in plugins:
        module, _, name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"cannot load {spec!r} (module:Class): {exc}") from None
        if cls.name in found and found[cls.name] is not cls:
            raise ValueError(f"{spec!r}: a service named {cls.name!r} exists already")
        found[cls.name] = cls
    return found
