"""A worker that claims one job and then hangs, for the acceptance tests:
``python -m tests.job_claimer ADDRESS QUEUE LEASE_SECONDS``.

Prints ``CLAIMED <job_id> <lease_token>`` once it holds a lease, then waits to be
killed, never heartbeating (the job must come back when its lease expires).
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from google.protobuf import duration_pb2

from mesh.scheduler.v1 import scheduler_pb2 as pb
from mesh.scheduler.v1 import scheduler_pb2_grpc as pb_grpc


async def main(address: str, queue: str, lease: float) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SchedulerServiceStub(channel)
        request = pb.ClaimRequest(queues=[queue], worker_id="doomed", max_jobs=1,
                                  lease_duration=duration_pb2.Duration(
                                      seconds=int(lease), nanos=int(lease % 1 * 1e9)),
                                  wait=duration_pb2.Duration(seconds=10))
        while True:
            reply = await stub.Claim(request, timeout=15)
            if reply.jobs:
                job = reply.jobs[0]
                print("CLAIMED", job.job_id, job.lease_token, flush=True)
                await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
