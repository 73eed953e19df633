"""A job worker pool in its own process, for the scheduler client tests:
``python -m tests.scheduler_worker QUEUE GRACE``.

Runs ``Worker.run()`` on QUEUE (concurrency 2, 2 s leases, shutdown grace GRACE
seconds) until SIGTERM. Its one handler, type ``sleep``, sleeps for the
payload's ``seconds``. Prints RUNNING once started, ``STARTED <job id>`` and
``DONE <job id>`` around each job, and ``STOPPED <stats>`` on the way out.
The cluster comes from MESH_ETCD_ENDPOINTS and MESH_CLUSTER.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from clients import JobContext, Mesh, Worker


async def sleep(job: JobContext) -> str:
    print("STARTED", job.id, flush=True)
    await asyncio.sleep(float(job.json()["seconds"]))
    print("DONE", job.id, flush=True)
    return "slept"


async def main(queue: str, grace: float) -> None:
    async with Mesh() as mesh:
        worker = Worker(mesh, queue, {"sleep": sleep}, concurrency=2, lease=2.0, poll=5.0,
                        grace=grace)
        print("RUNNING", flush=True)
        await worker.run()
        print("STOPPED", worker.stats, flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
