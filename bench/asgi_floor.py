"""The ASGI floor of the gateway's bench rows: a minimal Starlette app (``GET
/hello`` -> a small JSON object) on uvicorn with the gateway's own settings (no
access log, no lifespan), on a free port. Prints ``READY {"url": ...}``."""

from __future__ import annotations

import json
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench import aio


async def hello(request: Request) -> Response:
    return JSONResponse({"hello": "world"})


async def serve() -> None:
    # TCP as the gateway's (gateway.__main__._bind): TCP_NODELAY on accepted sockets.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    app = Starlette(routes=[Route("/hello", hello, methods=["GET"])])
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           lifespan="off"))
    port = sock.getsockname()[1]
    print("READY " + json.dumps({"url": f"http://127.0.0.1:{port}"}), flush=True)
    await server.serve(sockets=[sock])


if __name__ == "__main__":
    aio.serve(serve())
