"""``meshctl health ADDRESS``: one gRPC health check (grpc.health.v1), as a container
HEALTHCHECK or a load balancer asks it."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tls import Tls, open_channel
from meshctl.output import FAILED, OK, UNREACHABLE, emit

# Codes meaning the server was not reached (or not in time), rather than that it
# answered: those are exit 3, like any unreachable cluster.
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def check(address: str, service: str, tls: Tls | None, timeout: float,
                output: str = "text") -> int:
    """OK if ``address`` says SERVING for ``service`` ("" = the whole server), FAILED for
    any other answer, UNREACHABLE if it cannot be asked."""
    async with open_channel(address, tls) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            detail = ""
        except grpc.aio.AioRpcError as exc:
            # NOT_FOUND: the server does not know the service; it answered all the same.
            status = "UNREACHABLE" if exc.code() in _UNREACHABLE else \
                "SERVICE_UNKNOWN" if exc.code() == grpc.StatusCode.NOT_FOUND else exc.code().name
            detail = " ".join((exc.details() or "").split())
    code = OK if status == "SERVING" else UNREACHABLE if status == "UNREACHABLE" else FAILED
    if output == "json":
        emit({"address": address, "service": service, "status": status,
              "error": detail or None})
    elif code == UNREACHABLE:
        print(f"error: cannot reach {address}: {detail}", file=sys.stderr, flush=True)
    else:
        print(f"{address}{' ' + service if service else ''}: {status}"
              + (f" ({detail})" if detail and code != OK else ""), flush=True)
    return code
