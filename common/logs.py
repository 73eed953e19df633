"""Logging set-up shared by every Mesh process (node, coordinator, meshctl).

``--log-level`` picks the threshold and ``--log-format`` the shape: ``text`` for a
person at a terminal, ``json`` for a log shipper (one object per line with
``time``, ``level``, ``logger``, ``message`` and, when there is one,
``exception``). Both fall back to ``MESH_LOG_LEVEL`` and ``MESH_LOG_FORMAT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "add_log_flags", "configure"]

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# LogRecord attributes that are not ``extra=`` fields given by the caller.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a newline in a message stays escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # Fields passed with ``extra=`` are kept, as long as JSON can hold them.
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value if isinstance(value, str | int | float | bool | None) \
                    else repr(value)
        return json.dumps(entry, ensure_ascii=False)


def _default(name: str, default: str) -> str:
    return os.environ.get(f"MESH_{name}", default).lower()


def add_log_flags(p: argparse.ArgumentParser, *, level: str = "info") -> None:
    """--log-level and --log-format, with their MESH_* fallbacks."""
    p.add_argument("--log-level", type=str.lower, choices=LEVELS,
                   default=_default("LOG_LEVEL", level),
                   help="least severe messages logged (MESH_LOG_LEVEL; default %(default)s)")
    p.add_argument("--log-format", type=str.lower, choices=FORMATS,
                   default=_default("LOG_FORMAT", "text"),
                   help="text for people, json for one object per line (MESH_LOG_FORMAT; "
                        "default %(default)s)")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a test may swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


_installed: list[logging.Handler] = []
"""The handler `configure` installed last (the only one it replaces)."""


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's records at ``level`` and above to ``stream`` (default: stderr)
    as ``fmt``. Replaces the handler an earlier call installed (calling it twice is
    harmless) and leaves others alone (pytest's, an embedding program's)."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt.lower() not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt.lower() == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    while _installed:
        root.removeHandler(_installed.pop())
    root.addHandler(handler)
    _installed.append(handler)
    root.setLevel(level.upper())
    # Warnings (deprecations from libraries) then go through the same handler.
    logging.captureWarnings(True)
