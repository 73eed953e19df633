"""Bearer-token authentication on real nodes: static tokens and HS256 JWTs.

Every public call needs a valid token; a node that forwards a call passes the
token on and the owner checks it again. (Tenant isolation is not built yet:
every valid token reaches the same keys.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from clients import Mesh, UnauthenticatedError
from common.auth import bearer
from mesh.cache.v1 import cache_pb2, cache_pb2_grpc
from meshctl.processes import Etcd
from tests.conftest import non_owner

SECRET = b"a-secret-for-tests-only-0123456789"


def _jwt(secret: bytes = SECRET, **claims: Any) -> str:
    claims.setdefault("tenant", "acme")
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.fixture
def auth_flags(tmp_path: Path) -> list[str]:
    tokens = tmp_path / "tokens"
    tokens.write_text("# token tenant\nstatic-token-1 acme\n")
    secret = tmp_path / "jwt-secret"
    secret.write_bytes(SECRET)
    return ["--auth-tokens", str(tokens), "--auth-jwt-secret", str(secret)]


async def test_valid_tokens_pass_and_bad_ones_are_unauthenticated(
    local_mesh: Any, auth_flags: list[str], etcd: Etcd, cluster_name: str
) -> None:
    local = local_mesh(3, extra=auth_flags)

    async def outcome(token: str) -> str:
        async with Mesh(etcd=etcd.endpoint, cluster=cluster_name, token=token, timeout=3) as m:
            try:
                await m.cache.set("auth:k", b"v")
                lease = await m.locks.acquire("auth:lock", ttl=5)
                await lease.release()
            except UnauthenticatedError as exc:
                return exc.reason
            return "OK"

    now = int(time.time())
    assert await outcome("static-token-1") == "OK"
    assert await outcome(_jwt(exp=now + 60)) == "OK"
    assert await outcome("") == "TOKEN_MISSING"
    assert await outcome("no-such-token") == "TOKEN_INVALID"
    assert await outcome("not.a.jwt") == "TOKEN_INVALID"
    assert await outcome(_jwt(exp=now - 60)) == "TOKEN_EXPIRED"
    assert await outcome(_jwt(b"another-secret-of-the-same-length!", exp=now + 60)) \
        == "TOKEN_INVALID"
    assert await outcome(_jwt()) == "TOKEN_INVALID"  # no exp: refused
    assert await outcome(_jwt(tenant="", exp=now + 60)) == "TOKEN_INVALID"

    # Through a node that forwards: the token travels with the call.
    entry = non_owner(local, "auth:k")[0]
    async with grpc.aio.insecure_channel(entry) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        reply = await stub.Get(cache_pb2.GetRequest(key="auth:k"), timeout=5,
                               metadata=(bearer("static-token-1"),))
        assert reply.value == b"v"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Get(cache_pb2.GetRequest(key="auth:k"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
