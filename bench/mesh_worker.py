"""The scheduler rows' Mesh worker process: ``clients.worker.Worker`` running a no-op
handler, started by ``bench.scheduler`` as the counterpart of the Celery worker.

``python -m bench.mesh_worker --etcd HOST:PORT --cluster NAME --queue Q
--concurrency N --counters DIR [--no-chain]`` claims from ``Q`` in batches (the
pool's default: up to ``N`` jobs per Claim, as many as it has free slots), runs
each job's handler on its loop, and completes the job; the Complete leases the
slot's next job (the pool's default, ``chain``) unless ``--no-chain``. The
handler only counts the job in this process's counter in ``DIR``
(``bench.counter``). Prints ``READY`` once claiming; stops gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench import aio, counter
from clients import Mesh
from clients.worker import JobContext, Worker

JOB_TYPE = "bench.noop"


async def serve(args: argparse.Namespace) -> None:
    ran = counter.writer(args.counters)

    async def noop(ctx: JobContext) -> None:
        del ctx
        ran.add(1)

    async with Mesh(etcd=args.etcd, cluster=args.cluster) as mesh:
        worker = Worker(mesh, args.queue, {JOB_TYPE: noop}, concurrency=args.concurrency,
                        chain=not args.no_chain)
        run = asyncio.create_task(worker.run())
        await asyncio.sleep(0)  # run() has started claiming
        print("READY", flush=True)
        await run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mesh_worker",
                                description=__doc__.splitlines()[0])
    p.add_argument("--etcd", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--counters", required=True, help="directory of the job counters")
    p.add_argument("--no-chain", action="store_true",
                   help="complete jobs without leasing the next one in the same call")
    aio.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
