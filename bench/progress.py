"""A one-line progress bar on stderr: ``[3/27] mesh.get.c64 [#####.....] 0.7/1.3 s``."""

from __future__ import annotations

import sys
from typing import TextIO

_WIDTH = 24


class Progress:
    """Redrawn in place with ``\\r`` on a terminal; one line per workload otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.live = stream.isatty()
        self.name = ""
        self._index = 0
        self._drawn = 0

    def start(self, name: str) -> None:
        self._index += 1
        self.name = name

    def tick(self, elapsed: float, duration: float) -> None:
        if self.live:
            self._draw(self._line(elapsed, duration))

    def finish(self, summary: str) -> None:
        line = f"[{self._index}/{self.total}] {self.name}: {summary}"
        if self.live:
            self._draw(line)
            self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self._drawn = 0
        self.stream.flush()

    def _line(self, elapsed: float, duration: float) -> str:
        done = min(max(elapsed / duration, 0.0), 1.0) if duration > 0 else 1.0
        filled = int(done * _WIDTH)
        bar = "#" * filled + "." * (_WIDTH - filled)
        return (f"[{self._index}/{self.total}] {self.name} [{bar}] "
                f"{min(elapsed, duration):.1f}/{duration:.1f} s")

    def _draw(self, line: str) -> None:
        self.stream.write("\r" + line.ljust(self._drawn))
        self._drawn = len(line)
        self.stream.flush()
