"""A node's identity: its id, kept in its data dir, which only one process uses.

The coordinator knows a node's durable copies by its id, so a restarted node
must come back under the same one: an id generated once (host name + random
suffix) is written to ``<data dir>/node_id`` and read back at every start. The
data dir is locked (``flock`` on ``<data dir>/LOCK``) for as long as the process
lives, so two nodes can never share one; the kernel drops the lock when the
process dies, however it dies.

Each process also records its incarnation there (``<data dir>/incarnation``):
the etcd key a crashed predecessor left behind is this node's to take over at
once, while a key written by anyone else is another process's (see
`nodes.registration`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import uuid
from pathlib import Path
from typing import IO

__all__ = ["IdentityError", "claim", "succeed"]

_held: list[IO[bytes]] = []
"""Lock files of the data dirs this process claimed: open as long as it runs."""


class IdentityError(Exception):
    """The data dir cannot be this node's (in use, another node's, unwritable)."""


def claim(data_dir: Path, node_id: str = "") -> str:
    """Lock ``data_dir`` for this process and return the node's id: ``node_id`` if
    given (and recorded), else the one recorded there, else a new one (recorded)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / "LOCK", "ab")  # noqa: SIM115 - held until the process exits
    except OSError as exc:
        raise IdentityError(f"--data-dir {data_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise IdentityError(f"--data-dir {data_dir} is in use by another running node; give "
                            "each node its own --data-dir") from None
    _held.append(lock)
    path = data_dir / "node_id"
    recorded = path.read_text().strip() if path.exists() else ""
    if recorded and node_id and recorded != node_id:
        raise IdentityError(
            f"--data-dir {data_dir} holds the state of node {recorded!r}, not {node_id!r}: "
            f"give --node-id {recorded} or another --data-dir")
    chosen = node_id or recorded or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    if chosen != recorded:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(chosen + "\n")
        os.replace(temporary, path)  # never a half-written id
    return chosen


def succeed(data_dir: Path, incarnation: str) -> str:
    """Record ``incarnation`` as the process now running on ``data_dir`` (claimed
    by this process) and return the one recorded before it ("" if none)."""
    path = data_dir / "incarnation"
    before = path.read_text().strip() if path.exists() else ""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(incarnation + "\n")
    os.replace(temporary, path)
    return before
