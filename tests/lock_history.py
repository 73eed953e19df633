"""A checker for lock histories: no two holders at once, tokens growing in grant order.

Each client records its operations with the time it invoked them and the time
they completed (one clock for all: ``time.monotonic`` is system-wide on Linux,
so separate processes can share it). A client holds the lock from the moment
its acquire *completed* until it *invoked* the release (or noticed the lease
lost): that is when it may act on the lock, so those windows must never
overlap, whatever happened to the servers in between.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Op:
    """One finished operation of one client."""

    client: str
    kind: str  # "acquire" | "release" | "lost"
    invoke: float
    complete: float
    token: int = 0
    ok: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> Op:
        return cls(**json.loads(line))


@dataclass(frozen=True, slots=True)
class Hold:
    client: str
    token: int
    start: float
    end: float


def holds(history: Iterable[Op]) -> list[Hold]:
    """Each client's holding windows, in the order they started."""
    result: list[Hold] = []
    open_: dict[str, Op] = {}
    for op in sorted(history, key=lambda o: o.complete):
        if op.kind == "acquire" and op.ok:
            if op.client in open_:
                raise ValueError(f"{op.client} acquired twice without releasing")
            open_[op.client] = op
        elif op.kind in ("release", "lost") and op.client in open_:
            acquired = open_.pop(op.client)
            result.append(Hold(op.client, acquired.token, acquired.complete, op.invoke))
    for client, acquired in open_.items():
        result.append(Hold(client, acquired.token, acquired.complete, math.inf))
    return sorted(result, key=lambda h: h.start)


def check(history: Iterable[Op]) -> list[str]:
    """Every violation found (empty when the history is correct)."""
    problems: list[str] = []
    windows = holds(history)
    for before, after in itertools.pairwise(windows):
        if after.start < before.end:
            problems.append(
                f"{after.client} (token {after.token}) held from {after.start:.3f} while "
                f"{before.client} (token {before.token}) held until {before.end:.3f}")
        if after.token <= before.token:
            problems.append(
                f"token {after.token} of {after.client} granted after token {before.token} "
                f"of {before.client}")
    return problems
