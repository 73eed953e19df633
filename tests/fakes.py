"""Fakes for unit tests of pure logic (the real parts are tested with real processes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nodes.replication.machine import Clear, Persist

if TYPE_CHECKING:
    from nodes.replication.group import Group


class Here:
    """A service's forwarder on a node that leads every slot itself, in ``group``
    (give it to ``start_routing``: the handlers then get that group)."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def resolve(self, slot: int, context: object) -> Group:
        return self.group


class FakeJournal:
    """Records the rows a durable machine's commands persist, instead of writing them
    (as a group's journal: pass it to both the machine and the `Group`)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, str, Sequence[Sequence[Any]]]] = []
        self.cleared: list[tuple[str, ...]] = []
        self.flushed_ticket = 0  # every write is durable at once

    def write(self, group_id: int, origin_epoch: int, epoch: int, seq: int,
              writes: Sequence[Persist]) -> int:
        for w in writes:
            if isinstance(w, Clear):
                self.cleared.append(tuple(w.tables))
            else:
                self.writes.append((seq, w.sql, w.rows))
        self.flushed_ticket += 1
        return self.flushed_ticket

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return []

    def create_tables(self, schema: str, tables: Sequence[str]) -> None:
        """A service's tables: nothing to create, nothing is written."""
