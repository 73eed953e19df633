"""Fakes for unit tests of pure logic (the real parts are tested with real processes)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from nodes.replication.group import Group


class FakeJournal:
    """Records the SQL a durable machine queues, instead of writing it."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, str, list[Sequence[Any]]]] = []
        self.cleared: list[tuple[str, ...]] = []

    def write(self, group: Group, seq: int, epoch: int, sql: str, *rows: Sequence[Any]
              ) -> None:
        self.writes.append((seq, sql, list(rows)))

    def clear(self, group: Group, tables: Iterable[str]) -> None:
        self.cleared.append(tuple(tables))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return []
