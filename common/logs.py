"""Logging set-up shared by every Mesh process (node, coordinator, meshctl).

``--log-level`` picks the threshold and ``--log-format`` the shape: ``text`` for a
person at a terminal, ``json`` for a log shipper (one object per line with
``time``, ``level``, ``logger``, ``message`` and, when there is one,
``exception``). Both fall back to ``MESH_LOG_LEVEL`` and ``MESH_LOG_FORMAT``.

A server process (``background=True``) never writes a record from the thread
that logs it: the event loop would stop while stderr is a pipe nobody reads
(a stuck log shipper, a paused terminal), and with it every call and the
etcd lease. Records go through a bounded queue to a writer thread; past
`QUEUED` waiting records they are dropped and counted, and a warning with
the count takes their place once the queue has room (or at exit).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from common.errors import capped

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "add_log_flags", "configure", "loggable"]

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


MAX_LOGGED_CHARS = 512
"""Characters of one piece of outside input (a request path, an id a client chose)
that a log line quotes at most."""


def loggable(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """Outside input fit to quote in a log line: cut to ``limit`` characters, the last
    an ellipsis if cut, and control characters escaped (``\\n``, ``\\x1b``).

    Text logs are read a line at a time: a decoded ``%0A`` in a path would let a
    caller forge a line, and an unbounded one flood the log (the JSON format
    escapes, but does not cut)."""
    quoted = text[:limit + 1]  # one more than fits, so that `capped` marks the cut
    if not quoted.isprintable():
        quoted = repr(quoted)[1:-1]
    return capped(quoted, limit)


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


QUEUED = 10_000
"""Records a background writer holds at most; more are dropped (and counted)."""
STOP_WAIT = 2.0
"""Seconds a stopping process waits for its writer to write what is queued."""


class _Queued(logging.handlers.QueueHandler):
    """Puts records in the writer's queue; never blocks: drops them when it is full."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self._records = records
        self._lock = threading.Lock()
        self._dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is made now (its arguments may change later) and a
        # traceback is rendered now (its frames would be held), but the record
        # is otherwise kept whole for the writer's formatter: the JSON format
        # keeps the traceback in "exception", not in the message.
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        with self._lock:  # (any thread may log)
            try:
                self._note_dropped()
                self._records.put_nowait(record)
            except queue.Full:
                self._dropped += 1

    def _note_dropped(self) -> None:
        """Queue a record of the records dropped since the last one, where they were."""
        if self._dropped:
            self._records.put_nowait(_dropped(self._dropped))
            self._dropped = 0

    def closing(self, timeout: float) -> None:
        """The last chance to say how many were dropped (waiting for room)."""
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            with contextlib.suppress(queue.Full):
                self._records.put(_dropped(dropped), timeout=timeout)


def _dropped(count: int) -> logging.LogRecord:
    return logging.makeLogRecord({
        "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": f"{count} log records dropped: the log's reader fell behind"})


_TRACEBACKS = logging.Formatter()


class _ClientGone(logging.Filter):
    """gRPC logs a server stream's message that could not be sent, because the
    stream's client went away meanwhile (cancelled, disconnected), at ERROR with
    a traceback from its own code. For a subscription or a watch that is how it
    ends, routinely (40 subscribers leaving at once wrote 40 tracebacks): one
    INFO line says so instead. Anything else gRPC logs is left as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ == "ExecuteBatchError":
            said = record.getMessage()  # "... servicer method [/pkg.Service/Method]"
            method = said[said.rfind("[") + 1:].rstrip("]") if "[" in said else "a stream"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "%s: the stream's client left before a message " \
                "could be sent to it", (method,)
            record.exc_info, record.exc_text = None, None
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


_CLIENT_GONE = _ClientGone()
_GRPC_CORE = "grpc._cython.cygrpc"


class _Writer(logging.handlers.QueueListener):
    """The thread writing a `_Queued` handler's records."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None], source: _Queued,
                 handler: logging.Handler) -> None:
        super().__init__(records, handler)
        self._records = records
        self._source = source

    def stop(self) -> None:
        """Write what is queued, waiting `STOP_WAIT` seconds at most (a log reader
        that stopped for good must not keep the process from exiting)."""
        thread = self._thread
        if thread is None:
            return
        self._source.closing(STOP_WAIT)
        try:
            self._records.put(None, timeout=STOP_WAIT)  # the listener's sentinel
        except queue.Full:
            return
        thread.join(STOP_WAIT)
        self._thread = None


_installed: list[logging.Handler] = []
"""The handler `configure` installed last (the only one it replaces)."""
_writers: list[_Writer] = []


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None,
              *, background: bool = False) -> None:
    """Send every logger's records at ``level`` and above to ``stream`` (default: stderr)
    as ``fmt``; from a writer thread if ``background`` (servers: see above).
    Replaces the handler an earlier call installed (calling it twice is harmless)
    and leaves others alone (pytest's, an embedding program's)."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt.lower() not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None \
        else _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt.lower() == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    while _installed:
        root.removeHandler(_installed.pop())
    while _writers:
        _writers.pop().stop()
    if background:
        records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUED)
        queued = _Queued(records)
        writer = _Writer(records, queued, handler)
        writer.start()
        _writers.append(writer)
        handler = queued
    root.addHandler(handler)
    _installed.append(handler)
    root.setLevel(level.upper())
    # Warnings (deprecations from libraries) then go through the same handler.
    logging.captureWarnings(True)
    logging.getLogger(_GRPC_CORE).addFilter(_CLIENT_GONE)  # (adding it twice adds it once)


@atexit.register
def _flush() -> None:
    while _writers:
        _writers.pop().stop()
