"""Which network engine gRPC runs Mesh's processes on.

Since 1.80, gRPC Python does its socket I/O on EventEngine threads: each message
read or written crosses from an I/O thread to the completion-queue poller
thread and on to the asyncio loop, and each crossing is a thread wake-up. Mesh's
traffic is many small messages (calls, replication batches, acks), so those
wake-ups cost more than the messages: on this project's two-core bench machine
the kernel, mostly switching and waking threads, took a third of a node's CPU.
The engine gRPC used before 1.80 (iomgr) reads and writes in the thread that
polls the completion queue. With it, one cycle of the lock bench (16 in
parallel, R=1, 3 nodes) took 23% less CPU and 28% more cycles/s; the bare gRPC
echo and relay servers gained alike.

gRPC reads the choice (the ``GRPC_EXPERIMENTS`` variable) once, when ``grpc`` is
imported, so it has to be in a process's environment before it starts:
``LocalMesh`` (tests, ``make run``) and the bench put it in their children's
environment, and the Dockerfile and systemd units in the deployed processes'.
A ``GRPC_EXPERIMENTS`` the operator set is left as it is. A gRPC release that no
longer has these experiments logs "Unknown experiment" at start and runs on
EventEngine, as without the setting.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["EXPERIMENTS", "VARIABLE", "environment"]

VARIABLE = "GRPC_EXPERIMENTS"
EXPERIMENTS = "-event_engine_client,-event_engine_listener"
"""Off: EventEngine's client and listener endpoints (its callback completion
queue is on only with both), so gRPC's sockets are served by iomgr's poller."""


def environment(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` that starts gRPC on the polling engine, unless ``env``
    already chooses gRPC's experiments."""
    return {VARIABLE: EXPERIMENTS, **env}
