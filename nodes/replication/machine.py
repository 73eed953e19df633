"""What a service provides to be replicated: a deterministic state machine per group.

Every change of a group's state takes one path (like hashicorp/raft's FSM): the
service decides on the primary (times, ids, tokens, victims: whatever needs a
clock, randomness or local history) and writes the decision into a command;
`Group.propose` applies it at once on the primary and later on every replica
through the same `StateMachine.apply`, which returns `Applied`: the result, for
the proposer, and what a durable service must persist. The machine does no I/O:
the group hands its writes to the journal (etcd raft's ``Ready`` hand-off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from mesh.replication.v1 import replication_pb2 as rpb

if TYPE_CHECKING:
    from nodes.replication.group import Group

__all__ = ["NOTHING", "Applied", "Clear", "MachineFactory", "Persist", "ServiceKind",
           "StateMachine", "Write"]

Params: TypeAlias = Sequence[Any]


@dataclass(frozen=True, slots=True)
class Write:
    """One SQL statement for the journal, run once per row of parameters."""

    sql: str
    rows: Sequence[Params] = ((),)


@dataclass(frozen=True, slots=True)
class Clear:
    """Remove the group's rows from ``tables`` (each has a ``group_id`` column)."""

    tables: tuple[str, ...]


Persist: TypeAlias = Write | Clear


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying a command did: its ``result`` (returned to the proposer on
    the primary, ignored on replicas) and the ``writes`` that put it on disk
    (durable services only; the command counts as durable once they are)."""

    result: Any = None
    writes: Sequence[Persist] = ()


NOTHING = Applied()
"""A command that changed nothing (or nothing worth reporting)."""


class StateMachine(Protocol):
    """One service's state in one group.

    `apply` must depend on nothing but the state and the command (its payload
    and ``issued_at``), never the local clock: primary and replicas run it alike.
    """

    service: rpb.ServiceKind.ValueType
    durable: bool
    """Whether the state is kept on the node's disk (and read back at start-up)."""
    additive_restore: bool
    """Whether `restore` may be called once per chunk of one snapshot, each call
    adding that chunk's state: a big snapshot is then installed a piece at a time."""

    def apply(self, command: rpb.Command) -> Applied:
        """Apply one command issued by the group's primary."""

    def snapshot(self) -> Iterable[tuple[int, bytes]]:
        """A consistent copy of the state as ``(slot, data)`` chunks: captured in
        the call, in one step; the chunks may be made as they are iterated (a big
        state then never holds the event loop for long)."""

    def restore(self, chunks: Iterable[tuple[int, bytes]]) -> Sequence[Persist]:
        """Replace the (empty) state by a snapshot's chunks; what to persist."""

    def role_changed(self) -> None:
        """The group's role changed: it became writable here (a new primary, or
        unfenced) or stopped being so. Read ``group.writable`` and ``group.epoch``."""

    def close(self) -> None:
        """The group is leaving this node: release what the state holds."""


MachineFactory = Callable[["Group"], StateMachine]
"""Makes a service's empty state machine for a group."""

ServiceKind: TypeAlias = rpb.ServiceKind.ValueType
"""Which service a command or snapshot chunk belongs to."""
