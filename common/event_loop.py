"""The asyncio event loop a Mesh server process runs on: uvloop where it is installed.

gRPC's asyncio API runs on any asyncio loop, and much of a node's CPU goes to
the loop itself: every gRPC completion (a call arriving, a message read or
written) comes back to Python as a loop callback. uvloop (libuv, in Cython)
schedules those callbacks and polls its sockets for less CPU than the standard
library's loop (the README's "The event loop" gives the measured difference).
``--event-loop asyncio`` keeps the standard loop, as does ``auto`` when uvloop
is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LOOPS", "VARIABLE", "add_event_loop_flag", "chosen", "from_environment", "run",
           "running"]

T = TypeVar("T")

log = logging.getLogger(__name__)

LOOPS = ("auto", "uvloop", "asyncio")
"""``auto``: uvloop if it is installed, else asyncio's own loop."""

VARIABLE = "MESH_EVENT_LOOP"
"""The environment variable the servers' ``--event-loop`` and the benchmark read."""


def from_environment() -> str:
    """The loop ``MESH_EVENT_LOOP`` names (lower-cased), else ``auto``."""
    return os.environ.get(VARIABLE, "auto").lower()


def add_event_loop_flag(p: argparse.ArgumentParser) -> None:
    """--event-loop, with its MESH_EVENT_LOOP fallback."""
    p.add_argument("--event-loop", type=str.lower, choices=LOOPS,
                   default=from_environment(),
                   help="the asyncio loop to run on: uvloop, asyncio's own, or auto "
                        "(uvloop if installed) (MESH_EVENT_LOOP; default %(default)s)")


def chosen(name: str) -> str:
    """The loop ``name`` (one of `LOOPS`) runs on here: ``uvloop`` or ``asyncio``.

    Raises ValueError for an unknown name, or for ``uvloop`` when it is not installed.
    """
    if name not in LOOPS:
        raise ValueError(f"event loop {name!r}: must be one of {', '.join(LOOPS)}")
    installed = importlib.util.find_spec("uvloop") is not None
    if name == "uvloop" and not installed:
        raise ValueError("event loop 'uvloop': uvloop is not installed "
                         "(pip install uvloop, or --event-loop asyncio)")
    if name == "auto":
        return "uvloop" if installed else "asyncio"
    return name


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """``asyncio.run(main)`` on the loop ``loop`` (as `chosen` returns it), with
    `handle_exception` as the loop's exception handler."""
    if loop == "uvloop":
        import uvloop  # only here: the client and the tests never need it

        return uvloop.run(_handled(main))
    return asyncio.run(_handled(main))


async def _handled(main: Coroutine[Any, Any, T]) -> T:
    asyncio.get_running_loop().set_exception_handler(handle_exception)
    return await main


def handle_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's default handler, except for a TLS connection its peer reset
    during the handshake: the loop's TLS layer fails a future nobody awaits,
    and the default handler logs that as an ERROR with a traceback ("Future
    exception was never retrieved"). A peer that went away is no error of this
    process (a node killed, a network cut): one INFO line says so."""
    error = context.get("exception")
    if isinstance(error, ConnectionError) and _raised_in_tls_layer(error):
        log.info("a TLS connection was closed by its peer during the handshake (%s)",
                 type(error).__name__)
        return
    loop.default_exception_handler(context)


def _raised_in_tls_layer(error: BaseException) -> bool:
    """Whether ``error`` was raised in the loop's TLS protocol (uvloop's or asyncio's
    ``sslproto``), not in Mesh's code."""
    frames = error.__traceback__
    while frames is not None:
        if frames.tb_frame.f_code.co_filename.endswith(("sslproto.pyx", "sslproto.py")):
            return True
        frames = frames.tb_next
    return False


def running() -> str:
    """The running loop's kind, for a process's start-up line: ``uvloop`` or ``asyncio``."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
