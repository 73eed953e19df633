"""The baseline server: ``python -m bench.echo_server --listen 127.0.0.1:0``.

A bare grpc.aio server whose ``mesh.cache.v1.CacheService/Get`` returns one prebuilt
GetResponse (found, a fixed-size value, a version): the same method path and the
same messages as a Mesh node, registered the way the generated
``add_CacheServiceServicer_to_server`` does it, with no work behind them. It prints
``READY <address>`` once it serves, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from bench import aio
from mesh.cache.v1 import cache_pb2 as pb

SERVICE = "mesh.cache.v1.CacheService"


def add_echo_service(server: grpc.aio.Server, value_bytes: int) -> None:
    """Serve Get (only) with a constant response; other methods are UNIMPLEMENTED."""
    response = pb.GetResponse(found=True, value=b"x" * value_bytes, version=1)

    async def get(request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.GetResponse:
        return response

    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(
            get,
            request_deserializer=pb.GetRequest.FromString,
            response_serializer=pb.GetResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def serve(listen: str, value_bytes: int) -> None:
    server = grpc.aio.server()
    add_echo_service(server, value_bytes)
    await run_until_signalled(server, listen)


async def run_until_signalled(server: grpc.aio.Server, listen: str) -> None:
    """Serve on ``listen``, print ``READY <address>``, stop on SIGTERM or SIGINT
    (the bench's baseline servers all run so)."""
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {listen.rpartition(':')[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args()
    aio.serve(serve(args.listen, args.value_bytes))


if __name__ == "__main__":
    main()
