"""Rate limits at the edge: per bearer token and per client IP, before any node is called.

The node's limiter (`nodes.ratelimit`) does the counting: token buckets in
this process, or in Redis when ``--rate-limit-redis`` is given (the same flag
and Lua script as the nodes', so every gateway copy shares one budget). A
token's bucket is keyed by a digest of the token, never the token itself. The
nodes still apply their own per-tenant limits behind the gateway.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import grpc

from common.errors import MeshStatusError
from gateway.errors import GatewayError
from nodes.ratelimit import Limiter, RateLimits, limiter_for

__all__ = ["EdgeLimiter", "EdgeLimits"]


@dataclass(frozen=True)
class EdgeLimits:
    """Requests per second per token and per client IP (0: no limit)."""

    per_token: float = 0.0
    per_ip: float = 0.0
    burst: float = 0.0
    """Requests a full bucket holds (0: one second's worth, at least 1)."""
    redis_url: str = ""
    fail_open: bool = True


class EdgeLimiter:
    """Admits a request or raises a GatewayError (429, or 503 when Redis is away
    and limits fail closed)."""

    def __init__(self, limits: EdgeLimits, cluster: str) -> None:
        def one(rate: float, scope: str) -> Limiter | None:
            return limiter_for(RateLimits(rate=rate, burst=limits.burst,
                                          redis_url=limits.redis_url,
                                          fail_open=limits.fail_open),
                               f"{cluster}:gateway:{scope}")

        self._by_token = one(limits.per_token, "token")
        self._by_ip = one(limits.per_ip, "ip")
        self.limits = limits

    async def admit(self, token: str, ip: str) -> None:
        if self._by_ip is not None:
            await _check(self._by_ip, ip, "client IP", self.limits.per_ip)
        if self._by_token is not None and token:
            digest = hashlib.sha256(token.encode()).hexdigest()[:24]
            await _check(self._by_token, digest, "token", self.limits.per_token)

    async def close(self) -> None:
        for limiter in (self._by_token, self._by_ip):
            if limiter is not None:
                await limiter.close()


async def _check(limiter: Limiter, key: str, scope: str, rate: float) -> None:
    try:
        await limiter.admit(key, "")
    except MeshStatusError as exc:
        if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            wait = exc.retry_after or 1.0
            raise GatewayError(
                exc.code, f"over the gateway's limit of {rate:g} requests/s per {scope}; "
                f"retry in {wait:.3f} s", exc.reason.value,
                metadata={"scope": scope, "rate": f"{rate:g}"}, retry_after=wait) from None
        raise GatewayError(exc.code, exc.message, exc.reason.value,
                           retry_after=exc.retry_after) from None
