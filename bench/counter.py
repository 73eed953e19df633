"""Counting the jobs a worker ran across processes without I/O: 64-bit counters in
8-byte files, shared through mmap.

Each worker process writes its own file in a directory the benchmark chose
(``writer``; a process's threads share it under the caller's lock); the
benchmark reads their sum (``Total``). A counter is one aligned 8-byte word, so
a reader never sees half an update, and neither side makes a system call per job.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

SIZE = ctypes.sizeof(ctypes.c_uint64)


class Counter:
    """The counter in file ``path``, mapped into this process."""

    def __init__(self, path: Path) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), SIZE)
        self._word: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(self._map)

    @property
    def value(self) -> int:
        assert self._word is not None, "closed"
        return int(self._word.value)

    def add(self, n: int) -> None:
        assert self._word is not None, "closed"
        self._word.value += n

    def close(self) -> None:
        self._word = None  # the mapping cannot close while a ctypes view holds it
        self._map.close()


def writer(directory: str | Path) -> Counter:
    """A new counter at 0 for this process, in ``directory``."""
    path = Path(directory) / f"{os.getpid()}.count"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(SIZE))
    tmp.rename(path)  # whole, so a reader never maps a short file
    return Counter(path)


class Total:
    """The sum of every counter in ``directory``, including ones made later."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._counters: dict[str, Counter] = {}

    @property
    def value(self) -> int:
        for path in self.directory.glob("*.count"):
            if path.name not in self._counters:
                self._counters[path.name] = Counter(path)
        return sum(c.value for c in self._counters.values())

    def close(self) -> None:
        for c in self._counters.values():
            c.close()
        self._counters.clear()
