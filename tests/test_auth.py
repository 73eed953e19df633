"""Bearer-token authentication on real nodes: static tokens and HS256 JWTs.

Every public call needs a valid token; a node that forwards a call passes the
token on and the owner checks it again. A token's tenant is a namespace: keys,
locks, streams and queues (with their jobs) of one tenant are invisible to
every other.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from clients import (
    NO_STREAM,
    InvalidArgumentError,
    JobNotFoundError,
    Mesh,
    NewEvent,
    RecordedEvent,
    UnauthenticatedError,
)
from common.auth import bearer
from common.localmesh import Etcd
from mesh.cache.v1 import cache_pb2, cache_pb2_grpc
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


async def test_tenants_never_see_each_others_keys_locks_streams_or_jobs(
    local_mesh: Any, tmp_path: Path, etcd: Etcd, cluster_name: str
) -> None:
    tokens = tmp_path / "tenants"
    tokens.write_text("token-acme acme\ntoken-globex globex\n")
    local_mesh(3, extra=["--auth-tokens", str(tokens)])

    def connect(token: str) -> Mesh:
        return Mesh(etcd=etcd.endpoint, cluster=cluster_name, token=token, timeout=5)

    async with connect("token-acme") as acme, connect("token-globex") as globex:
        # Cache: the same key is two keys.
        await acme.cache.set("shared:k", b"acme's")
        assert await globex.cache.get("shared:k") is None
        await globex.cache.set("shared:k", b"globex's")
        assert await acme.cache.get("shared:k") == b"acme's"
        assert await acme.cache.mget(["shared:k", "nope"]) == [b"acme's", None]
        async with acme.cache.watch(prefixes=["shared:"]) as changes:
            await globex.cache.set("shared:other", b"x")
            await acme.cache.set("shared:mine", b"y")
            async for change in changes:
                assert change.key == "shared:mine"  # never globex's key, shown unscoped
                break
        with pytest.raises(InvalidArgumentError):
            await acme.cache.set("acme\x1fshared:k", b"forged")

        # Locks: both hold "the same" lock at once; each sees only its own holder.
        held = await acme.locks.acquire("shared:lock", ttl=10)
        other = await globex.locks.try_acquire("shared:lock", ttl=10)
        assert other is not None
        assert [h.lease_id for h in (await globex.locks.describe("shared:lock")).holders] \
            == [other.lease_id]
        await held.release()
        await other.release()

        # Events: streams, reads, slot logs and subscriptions are per tenant.
        await acme.events.append("account-1", [NewEvent("Opened", {"by": "acme"})],
                                 expected=NO_STREAM)
        page = await globex.events.read("account-1")
        assert page.events == [] and not page.stream_exists
        await globex.events.append("account-1", [NewEvent("Opened", {"by": "globex"})],
                                   expected=NO_STREAM)
        mine = [e async for e in acme.events.read_all()]
        assert [(e.stream, e.json()) for e in mine] == [("account-1", {"by": "acme"})]
        # Scheduler: queues (and their jobs) are per tenant; job ids do not cross.
        job_id = await acme.scheduler.enqueue("shared:q", "send", b"acme's")
        assert await globex.scheduler.claim("shared:q", max_jobs=5) == []
        assert (await globex.scheduler.stats("shared:q")).ready == 0
        with pytest.raises(JobNotFoundError):
            await globex.scheduler.get_job(job_id)
        with pytest.raises(JobNotFoundError):
            await globex.scheduler.cancel(job_id)
        [claimed] = await acme.scheduler.claim("shared:q", max_jobs=5)
        assert (claimed.job_id, claimed.queue, claimed.payload) == (job_id, "shared:q", b"acme's")

        async with globex.events.subscribe(category="account-") as sub:
            async for event in sub:
                assert isinstance(event, RecordedEvent)
                assert (event.stream, event.json()) == ("account-1", {"by": "globex"})
                break
