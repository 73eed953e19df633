"""Rate limits per tenant (and per method when configured): token buckets.

Every call to a public service takes one token from its tenant's bucket and,
if its method has a limit of its own, one from the tenant's bucket for that
method. An empty bucket answers RESOURCE_EXHAUSTED with a RetryInfo saying when
a token will be there.

Two stores, one algorithm (a bucket of ``burst`` tokens refilled at ``rate``
per second):

- **local**: buckets in this process; each node enforces the limit on the calls
  it serves, so N nodes let a tenant through at up to N times the rate;
- **global**: buckets in Redis, read and updated atomically by one Lua script
  per call (with Redis's own clock), so the limit holds across every node, as
  Envoy's global rate limit service does. If Redis cannot be reached the
  limiter fails open (calls pass) or closed (UNAVAILABLE), as configured; it
  logs the outage once, counts it in the metrics, and tries Redis again a
  second later rather than on every call.

A call forwarded from one node to another is counted on both: never more than
the limit, slightly less for forwarded calls (the typed client calls the
owning node directly).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from common.errors import MeshStatusError, Reason

__all__ = ["GlobalLimiter", "Limiter", "LocalLimiter", "RateLimits", "rate_limited"]

log = logging.getLogger(__name__)

RETRY_REDIS_AFTER = 1.0
"""Seconds without trying Redis after it failed."""


@dataclass(frozen=True)
class RateLimits:
    """Calls per second per tenant; 0 means no limit."""

    rate: float = 0.0
    burst: float = 0.0
    """Tokens a full bucket holds (0: one second's worth, at least 1)."""
    methods: dict[str, float] = field(default_factory=dict)
    """Method name (e.g. ``Append``) -> its own calls per second per tenant."""
    redis_url: str = ""
    """Global mode's Redis (``redis://host:port/db``); empty: local buckets."""
    fail_open: bool = True
    """When Redis is unreachable: let calls through (True) or refuse them."""

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or bool(self.methods)

    def capacity(self, rate: float) -> float:
        return self.burst if self.burst > 0 else max(rate, 1.0)


class Limiter(Protocol):
    limited: int
    """Calls refused so far (for metrics)."""
    store_errors: int
    """Calls that found the global store unreachable (for metrics)."""

    async def admit(self, tenant: str, method: str) -> None:
        """Take a token for a call, or raise RESOURCE_EXHAUSTED."""

    async def close(self) -> None: ...


def rate_limited(tenant: str, scope: str, rate: float, retry_after: float) -> MeshStatusError:
    who = f"tenant {tenant!r}" if tenant else "this caller"
    return MeshStatusError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{who} is over its rate limit of {rate:g} calls/s ({scope}); retry in "
        f"{retry_after:.3f} s", Reason.RATE_LIMITED,
        {"tenant": tenant, "scope": scope, "rate": f"{rate:g}"}, retry_after=retry_after)


class _Scopes:
    """The buckets a call draws from: ``(scope, rate)``."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits

    def of(self, method: str) -> list[tuple[str, float]]:
        scopes = [("all", self.limits.rate)] if self.limits.rate > 0 else []
        own = self.limits.methods.get(method)
        if own:
            scopes.append((method, own))
        return scopes


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class LocalLimiter:
    """Token buckets in this process."""

    def __init__(self, limits: RateLimits) -> None:
        self._scopes = _Scopes(limits)
        self._limits = limits
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.limited = 0
        self.store_errors = 0

    async def admit(self, tenant: str, method: str) -> None:
        self.take(tenant, method, time.monotonic())

    def take(self, tenant: str, method: str, now: float) -> None:
        """Take the call's tokens at ``now`` (all of them, or none)."""
        scopes = self._scopes.of(method)
        buckets = []
        for scope, rate in scopes:
            capacity = self._limits.capacity(rate)
            bucket = self._buckets.get((tenant, scope))
            if bucket is None:
                bucket = self._buckets[(tenant, scope)] = _Bucket(capacity, now)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
            if bucket.tokens < 1.0:
                self.limited += 1
                raise rate_limited(tenant, scope, rate, (1.0 - bucket.tokens) / rate)
            buckets.append(bucket)
        for bucket in buckets:
            bucket.tokens -= 1.0

    async def close(self) -> None:
        pass


# KEYS: one bucket per scope. ARGV: rate and capacity for each, then the ttl (ms).
# Refill every bucket by Redis's clock, then take one token from each only if
# all have one: the reply is {1} or {0, index of the empty bucket, ms to wait}.
_SCRIPT = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local state = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local got = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(got[1]) or capacity
  local at = tonumber(got[2]) or t
  tokens = math.min(capacity, tokens + math.max(0, t - at) * rate)
  if tokens < 1 then
    return {0, i, math.ceil((1 - tokens) / rate * 1000)}
  end
  state[i] = tokens
end
local ttl = tonumber(ARGV[2 * #KEYS + 1])
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'tokens', state[i] - 1, 'at', t)
  redis.call('PEXPIRE', key, ttl)
end
return {1}
"""


class GlobalLimiter:
    """Token buckets in Redis, shared by every node of the cluster."""

    def __init__(self, limits: RateLimits, cluster: str) -> None:
        import redis.asyncio as redis  # only global mode needs the client

        self._limits = limits
        self._scopes = _Scopes(limits)
        self._prefix = f"mesh:{cluster}:ratelimit:"
        self._redis: Any = redis.Redis.from_url(
            limits.redis_url, socket_timeout=0.25, socket_connect_timeout=0.25)
        self._script = self._redis.register_script(_SCRIPT)
        self._down_until = 0.0
        self.limited = 0
        self.store_errors = 0
        self.failing = False
        """Redis was unreachable at the last try (for metrics and logs)."""

    async def admit(self, tenant: str, method: str) -> None:
        scopes = self._scopes.of(method)
        if not scopes:
            return
        if time.monotonic() < self._down_until:
            self._unreachable(tenant)
            return
        keys = [f"{self._prefix}{tenant}:{scope}" for scope, _ in scopes]
        args: list[float] = []
        for _, rate in scopes:
            args += [rate, self._limits.capacity(rate)]
        ttl_ms = int(max(self._limits.capacity(r) / r for _, r in scopes) * 1000) + 1000
        try:
            reply = await self._script(keys=keys, args=[*args, ttl_ms])
        except Exception as exc:  # connection refused, timeout, Redis error
            self._down_until = time.monotonic() + RETRY_REDIS_AFTER
            if not self.failing:
                log.error("rate limits: Redis at %s is unreachable (%s); failing %s",
                          self._limits.redis_url, exc,
                          "open" if self._limits.fail_open else "closed")
            self.failing = True
            self._unreachable(tenant)
            return
        if self.failing:
            log.warning("rate limits: Redis at %s is back", self._limits.redis_url)
            self.failing = False
        if int(reply[0]) == 1:
            return
        scope, rate = scopes[int(reply[1]) - 1]
        self.limited += 1
        raise rate_limited(tenant, scope, rate, int(reply[2]) / 1000)

    def _unreachable(self, tenant: str) -> None:
        self.store_errors += 1
        if not self._limits.fail_open:
            raise MeshStatusError(
                grpc.StatusCode.UNAVAILABLE,
                "the rate limiter's store (Redis) is unreachable and limits fail closed; "
                "retry later", Reason.RATE_LIMITER_UNAVAILABLE, {"tenant": tenant},
                retry_after=RETRY_REDIS_AFTER)

    async def close(self) -> None:
        await self._redis.aclose()


def limiter_for(limits: RateLimits, cluster: str) -> Limiter | None:
    """The limiter the flags ask for, or None (no limits)."""
    if not limits.enabled:
        return None
    return GlobalLimiter(limits, cluster) if limits.redis_url else LocalLimiter(limits)
