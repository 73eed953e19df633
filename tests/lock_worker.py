"""A lock client in its own process, for the acceptance tests: ``python -m tests.lock_worker``.

Modes:
  counter NAME COUNTER_FILE TOKENS_FILE N   N times: take the lock, increment the
                                            number in COUNTER_FILE, append the token
                                            to TOKENS_FILE, release.
  hold NAME TTL                             take the lock (refreshed in the
                                            background), print HELD <token>, wait.
  guarded NAME TTL PORT                     hold the lock and keep sending writes
                                            with its token to the fenced resource at
                                            127.0.0.1:PORT, printing each answer;
                                            it never checks the lease itself.

The cluster comes from MESH_ETCD_ENDPOINTS and MESH_CLUSTER.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from clients import Mesh


def _increment(counter_file: Path, tokens_file: Path, token: int) -> None:
    """Plain read-modify-write file I/O, guarded by nothing but the lock."""
    value = int(counter_file.read_text() or "0")
    counter_file.write_text(str(value + 1))
    with tokens_file.open("a") as tokens:
        tokens.write(f"{token}\n")


async def counter(mesh: Mesh, name: str, counter_file: Path, tokens_file: Path,
                  times: int) -> None:
    for _ in range(times):
        lease = await mesh.locks.acquire(name, ttl=10.0)
        _increment(counter_file, tokens_file, lease.token)
        await lease.release()
    print("DONE", flush=True)


async def hold(mesh: Mesh, name: str, ttl: float) -> None:
    async with mesh.lock(name, ttl=ttl) as lease:
        print("HELD", lease.token, flush=True)
        await asyncio.Event().wait()


async def guarded(mesh: Mesh, name: str, ttl: float, port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    async with mesh.lock(name, ttl=ttl) as lease:
        print("HELD", lease.token, flush=True)
        while True:
            writer.write(f"{lease.token}\n".encode())
            await writer.drain()
            answer = (await reader.readline()).decode().strip()
            print(answer, lease.token, flush=True)
            await asyncio.sleep(0.05)


async def main(argv: list[str]) -> None:
    mode, name, *rest = argv
    async with Mesh(timeout=30.0) as mesh:  # 20 of these start at once on 2 cores
        if mode == "counter":
            await counter(mesh, name, Path(rest[0]), Path(rest[1]), int(rest[2]))
        elif mode == "hold":
            await hold(mesh, name, float(rest[0]))
        elif mode == "guarded":
            await guarded(mesh, name, float(rest[0]), int(rest[1]))
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
