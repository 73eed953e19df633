"""What a service provides to be replicated: a deterministic state machine per group."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, TypeAlias

from mesh.replication.v1 import replication_pb2 as rpb

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["MachineFactory", "ServiceKind", "StateMachine"]


class StateMachine(Protocol):
    """One service's state in one group.

    On the primary, the service changes the state itself while serving a
    request and hands the resulting commands to its group (``Group.append``);
    on replicas, `apply` replays them. Applying must depend on nothing but the
    state and the command (its payload and ``issued_at``): never the local clock.
    """

    service: rpb.ServiceKind.ValueType
    durable: bool
    """Whether the state is kept on the node's disk (and read back at start-up)."""

    def apply(self, command: rpb.Command) -> None:
        """Replay one command issued by the group's primary."""

    def snapshot(self) -> list[tuple[int, bytes]]:
        """A consistent copy of the state as ``(slot, data)`` chunks, taken at once."""

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> None:
        """Replace the (empty) state by a snapshot's chunks."""

    def role_changed(self) -> None:
        """The group's role changed: it became writable here (a new primary, or
        unfenced) or stopped being so. Read ``group.writable`` and ``group.epoch``."""

    def close(self) -> None:
        """The group is leaving this node: release what the state holds."""


MachineFactory = Callable[["Group"], StateMachine]

ServiceKind: TypeAlias = rpb.ServiceKind.ValueType
"""Which service a command or snapshot chunk belongs to."""
"""Makes a service's empty state machine for a group."""
