"""The seam every service plugs into the node through.

A service is one folder in ``nodes/`` with a class that implements `Service`,
and one line in the registry (`nodes.services.SERVICES`) that maps its
``--services`` name to that class. The node does the rest, the same way for
every service: it gives replication the service's state machines, serves its
gRPC service on the client and peer ports (authentication, tenancy, rate
limits and metrics by `nodes.rpc`; routing by `nodes.routing`), starts and
closes it, runs its periodic work (`nodes.ticker`), and adds its figures to
``/metrics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

from google.protobuf import descriptor

from common.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from common.metrics import Snapshot
    from nodes.config import NodeConfig
    from nodes.forwarding import Forwarder
    from nodes.replication.group import Group
    from nodes.replication.journal import Journal
    from nodes.replication.machine import ServiceKind, StateMachine
    from nodes.replication.manager import Replication

__all__ = ["Service", "needs_journal"]


class Service(Protocol):
    """What the node asks of a service."""

    name: ClassVar[str]
    """Its name in ``--services``."""
    kind: ClassVar[ServiceKind]
    """Its `ServiceKind`: which commands and snapshot chunks are its machine's."""
    durable: ClassVar[bool]
    """Whether its state is kept in the node's journal (and read back at start)."""
    descriptor: ClassVar[descriptor.ServiceDescriptor]
    """The gRPC service it serves."""

    @property
    def tick_interval_ns(self) -> int:
        """How often `tick` runs at least, on each group this node leads (0: never)."""
        ...

    @classmethod
    def create(cls, config: NodeConfig, journal: Journal | None,
               clock: Clock = SYSTEM_CLOCK) -> Service:
        """The service for a node with ``config`` (``journal``: when durable); its
        state code reads the time from ``clock`` only (tests pass a manual one)."""
        ...

    def machine(self, group: Group) -> StateMachine:
        """Its empty state machine for a group (the replication layer's factory)."""
        ...

    def start(self, replication: Replication, forwarder: Forwarder) -> None:
        """The node serves: start background work (on the event loop)."""
        ...

    async def close(self) -> None:
        """The node stops: end long-lived streams and background work."""
        ...

    def tick(self, group: Group, now_ns: int) -> int | None:
        """Periodic primary-side work on one group this node can write to (expiry,
        scavenging, retention: each change proposed like any write); the instant
        it wants the next tick if sooner than its interval (``now_ns``: busy)."""
        ...

    def metrics(self, replication: Replication) -> Snapshot:
        """Its gauges and counters now (summed up once a second, on the loop)."""
        ...


def needs_journal(journal: Journal | None, name: str) -> Journal:
    """The journal a durable service is created with (the node makes one for it)."""
    if journal is None:
        raise ValueError(f"{name} is a durable service: the node must give it a journal")
    return journal
