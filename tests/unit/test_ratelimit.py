"""Token buckets, local (pure) and global (against a real redis-server)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common import localmesh
from common.errors import MeshStatusError, Reason
from common.localmesh import RedisServer
from nodes.ratelimit import GlobalLimiter, LocalLimiter, RateLimits


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    limiter = LocalLimiter(RateLimits(rate=10, burst=3))
    for _ in range(3):
        limiter.take("acme", "Get", 100.0)
    with pytest.raises(MeshStatusError) as refused:
        limiter.take("acme", "Get", 100.0)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == Reason.RATE_LIMITED
    assert refused.value.retry_after == pytest.approx(0.1)
    limiter.take("globex", "Get", 100.0)  # another tenant, another bucket
    limiter.take("acme", "Get", 100.11)  # a token is back after 1/rate
    assert limiter.limited == 1


def test_a_method_limit_applies_on_top_of_the_tenant_limit() -> None:
    limiter = LocalLimiter(RateLimits(rate=100, methods={"Append": 1}))
    limiter.take("acme", "Append", 0.0)
    with pytest.raises(MeshStatusError) as refused:
        limiter.take("acme", "Append", 0.0)
    assert refused.value.metadata["scope"] == "Append"
    for _ in range(50):  # other methods are not held back by Append's bucket
        limiter.take("acme", "Read", 0.0)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_redis_whose_picked_port_was_taken_picks_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the harness's etcd: a port picked free a moment ago and taken since (here
    by a socket that accepts and never answers) is not mistaken for redis, and
    redis starts on another."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])
        real = localmesh.free_port
        monkeypatch.setattr(localmesh, "free_port", lambda: next(picks, 0) or real())
        server = RedisServer(tmp_path)
        try:
            server.start()
            assert server.port != busy and server.child is not None and server.child.alive()
        finally:
            server.stop()


async def test_global_buckets_live_in_redis(redis_server: RedisServer) -> None:
    limits = RateLimits(rate=1, burst=2, redis_url=redis_server.url)
    first, second = GlobalLimiter(limits, "c"), GlobalLimiter(limits, "c")  # two nodes
    await first.admit("acme", "Get")
    await second.admit("acme", "Get")
    with pytest.raises(MeshStatusError) as refused:
        await first.admit("acme", "Get")
    assert refused.value.reason == Reason.RATE_LIMITED
    assert 0 < (refused.value.retry_after or 0) <= 1.0
    await second.admit("globex", "Get")
    await first.close()
    await second.close()


async def test_an_unreachable_redis_fails_open_or_closed_as_configured(
    redis_server: RedisServer
) -> None:
    url = redis_server.url
    redis_server.stop()
    lenient = GlobalLimiter(RateLimits(rate=1, burst=1, redis_url=url), "c")
    for _ in range(3):
        await lenient.admit("acme", "Get")  # open: every call passes
    assert lenient.failing and lenient.store_errors == 3
    strict = GlobalLimiter(RateLimits(rate=1, burst=1, redis_url=url, fail_open=False), "c")
    with pytest.raises(MeshStatusError) as refused:
        await strict.admit("acme", "Get")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == Reason.RATE_LIMITER_UNAVAILABLE
    await lenient.close()
    await strict.close()
