"""``mesh.cache.pipeline()``: many cache commands for the price of a few calls.

Commands are queued, then `execute` sends them and returns their results in
order, as redis-py's pipeline does. Gets and unconditional sets bound for one
node travel as one MGet / MSet (through the client's coalescing, whatever its
``coalesce`` setting); conditional sets, deletes and increments go as their own
calls, all at once. Each command keeps its own answer or error: one failed
command does not fail the others.

Order: commands run in waves. A command naming a key that an earlier command
of the current wave already names starts the next wave, and a wave starts
once the one before has finished, so the commands of one key apply in the
order they were queued (a set then a get of the same key reads the set).
Across keys nothing is ordered, and nothing is atomic: like Redis Cluster's
pipelines, not a transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.cache import TTL, CacheClient, Value

__all__ = ["CachePipeline"]


@dataclass(frozen=True, slots=True)
class _Command:
    key: str
    run: Callable[[], Awaitable[Any]]


class CachePipeline:
    """Queued cache commands; see the module doc. Reusable: `execute` empties it."""

    def __init__(self, cache: CacheClient) -> None:
        self._cache = cache
        self._commands: list[_Command] = []
        self._timeout: float | None = None

    def __len__(self) -> int:
        return len(self._commands)

    def get(self, key: str, *, linearizable: bool = False) -> CachePipeline:
        """Queue a get: its result is the value, or None. ``linearizable``: as
        ``mesh.cache.get`` takes it (such gets travel as linearizable MGets)."""
        async def run() -> bytes | None:
            r = await self._cache._read(key, linearizable, self._timeout, coalesce=True)
            return r.value if r.found else None
        return self._add(key, run)

    def set(self, key: str, value: Value, *, ttl: TTL = None, only_if_absent: bool = False,
            only_if_version: int = 0) -> CachePipeline:
        """Queue a set: its result is the new version (or KeyExistsError /
        VersionMismatchError when its condition fails)."""
        return self._add(key, lambda: self._cache._set(
            key, value, ttl, only_if_absent, only_if_version, self._timeout, True))

    def delete(self, key: str, *, only_if_version: int = 0) -> CachePipeline:
        """Queue a delete: its result is whether the key existed."""
        return self._add(key, lambda: self._cache.delete(
            key, only_if_version=only_if_version, timeout=self._timeout))

    def incr(self, key: str, delta: int = 1, *, ttl: TTL = None) -> CachePipeline:
        """Queue an increment: its result is the new value."""
        return self._add(key, lambda: self._cache.incr(key, delta, ttl=ttl,
                                                        timeout=self._timeout))

    def _add(self, key: str, run: Callable[[], Awaitable[Any]]) -> CachePipeline:
        self._commands.append(_Command(key, run))
        return self

    async def execute(self, *, raise_on_error: bool = True,
                      timeout: float | None = None) -> list[Any]:
        """Send every queued command; their results in order. ``raise_on_error``:
        raise the first command's error once all have run (as redis-py does);
        False: errors take their commands' places in the list. ``timeout``
        bounds each command (the client's default if None)."""
        commands, self._commands = self._commands, []
        self._timeout = timeout
        results: list[Any] = []
        for wave in _waves(commands):
            results += await asyncio.gather(*(c.run() for c in wave), return_exceptions=True)
        if raise_on_error:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results


def _waves(commands: list[_Command]) -> list[list[_Command]]:
    """``commands`` cut where a key repeats within the current wave."""
    waves: list[list[_Command]] = [[]]
    keys: set[str] = set()
    for command in commands:
        if command.key in keys:
            waves.append([])
            keys.clear()
        waves[-1].append(command)
        keys.add(command.key)
    return [wave for wave in waves if wave]
