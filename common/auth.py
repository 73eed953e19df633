"""Bearer-token authentication: ``authorization: Bearer <token>`` -> the caller's
``Principal`` (tenant and role).

Two kinds of token, either or both (``--auth-tokens``, ``--auth-jwt-secret``):

- static tokens, from a file of ``<token> <tenant> [admin|client]`` lines
  (``#`` comments; the role defaults to ``client``);
- HS256 JWTs signed with a shared secret (a file holding it), whose ``tenant``
  claim (else ``sub``) names the tenant and ``role`` claim the role (default
  ``client``). ``exp`` is required: a number, not past (a few seconds of leeway
  for clock skew) and not further out than ``--auth-jwt-max-lifetime``; ``aud``
  and ``iss`` must match ``--auth-jwt-audience`` / ``--auth-jwt-issuer`` when set.

With neither, authentication is off and every caller is the ``default``
tenant. A missing, malformed, expired or wrongly signed token is
UNAUTHENTICATED (reasons TOKEN_MISSING, TOKEN_INVALID, TOKEN_EXPIRED); the
admission layer (``nodes.rpc``) answers PERMISSION_DENIED (ADMIN_REQUIRED) to
a valid non-admin token on an admin-only method.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.errors import MeshStatusError, Reason
from common.process import env
from common.tenancy import SEPARATOR

__all__ = ["DEFAULT_TENANT", "Authenticator", "JwtPolicy", "Principal", "Role",
           "add_auth_flags", "bearer", "bearer_interceptors", "jwt_policy"]

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
JWT_LEEWAY = 5.0
"""Seconds of clock skew forgiven on ``exp``."""
DEFAULT_JWT_MAX_LIFETIME = 30 * 86400.0
"""Longest a JWT may still be valid for, from now, by default (seconds)."""


class Role(enum.StrEnum):
    """What a token may do: ``admin`` also the cluster's admin mutations."""

    ADMIN = "admin"
    CLIENT = "client"


@dataclass(frozen=True)
class Principal:
    """Who a call is: its tenant (a namespace) and its role."""

    tenant: str
    role: Role = Role.CLIENT

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


_ROLES = frozenset(r.value for r in Role)


@dataclass(frozen=True)
class JwtPolicy:
    """What a JWT must satisfy besides its signature and an ``exp`` not past."""

    audience: str = ""
    """Required ``aud`` (empty: a token must carry none)."""
    issuer: str = ""
    """Required ``iss`` (empty: not checked)."""
    max_lifetime: float = DEFAULT_JWT_MAX_LIFETIME
    """Longest ``exp - now`` accepted, seconds; 0 = no limit. A leaked token that
    never expires is a permanent credential: this bounds what a signer can mint."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer(token: str) -> tuple[str, str]:
    """The metadata pair that carries ``token``."""
    return ("authorization", f"Bearer {token}")


def _unauthenticated(reason: Reason, why: str) -> MeshStatusError:
    return MeshStatusError(grpc.StatusCode.UNAUTHENTICATED, why, reason)


def _invalid(why: str) -> MeshStatusError:
    return _unauthenticated(Reason.TOKEN_INVALID, why)


def parse_token_line(line: str, where: str) -> tuple[str, Principal] | None:
    """One line of a tokens file -> (token, principal); None for a blank or comment
    line; ValueError naming ``where`` (file:line) for a malformed one."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    parts = line.split()
    if len(parts) not in (2, 3) or SEPARATOR in parts[1]:
        raise ValueError(f"{where}: expected '<token> <tenant> [admin|client]'")
    role = parts[2] if len(parts) == 3 else Role.CLIENT.value
    if role not in _ROLES:
        raise ValueError(f"{where}: unknown role {role!r}: expected 'admin' or 'client'")
    return parts[0], Principal(parts[1], Role(role))


class Authenticator:
    """Turns a call's metadata into its principal, or refuses it."""

    def __init__(self, tokens: Mapping[str, str | Principal] | None = None,
                 jwt_secret: bytes | None = None, policy: JwtPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        # Keyed by digest: a dict lookup on the secret itself could leak, by its
        # timing, how much of a guess matched.
        self._tokens = {_digest(t): p if isinstance(p, Principal) else Principal(p)
                        for t, p in (tokens or {}).items()}
        self._secret = jwt_secret
        self._policy = policy or JwtPolicy()
        self._clock = clock

    @classmethod
    def from_files(cls, tokens_file: str = "", secret_file: str = "",
                   policy: JwtPolicy | None = None) -> Authenticator | None:
        """From the flags' files; None when both are empty (authentication off)."""
        if not tokens_file and not secret_file:
            return None
        tokens: dict[str, str | Principal] = {}
        if tokens_file:
            for number, line in enumerate(Path(tokens_file).read_text().splitlines(), 1):
                parsed = parse_token_line(line, f"{tokens_file}:{number}")
                if parsed is not None:
                    tokens[parsed[0]] = parsed[1]
        secret = Path(secret_file).read_bytes().strip() if secret_file else None
        return cls(tokens, secret, policy)

    def tenant(self, metadata: Mapping[str, str]) -> str:
        """The tenant of a call with ``metadata``; raises UNAUTHENTICATED."""
        return self.principal(metadata).tenant

    def principal(self, metadata: Mapping[str, str]) -> Principal:
        """Who makes a call with ``metadata``; raises UNAUTHENTICATED."""
        header = metadata.get("authorization", "")
        if not header:
            raise _unauthenticated(Reason.TOKEN_MISSING,
                                   "no bearer token: send 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated(Reason.TOKEN_INVALID, "the authorization is not a bearer token")
        token = token.strip()
        principal = self._tokens.get(_digest(token))
        if principal is not None:
            return principal
        if self._secret is not None and token.count(".") == 2:
            return self._jwt_principal(token)
        raise _invalid("unknown or malformed token")

    def _jwt_principal(self, token: str) -> Principal:
        # PyJWT comes with `meshkit[server]`: only a server checks tokens, and the
        # client imports this module for `bearer` alone.
        import jwt

        assert self._secret is not None
        policy = self._policy
        try:
            # exp is checked below, not by PyJWT: it coerces with int(), so numeric
            # strings and booleans would pass as numbers.
            claims: dict[str, Any] = jwt.decode(
                token, self._secret, algorithms=["HS256"], leeway=JWT_LEEWAY,
                audience=policy.audience or None, issuer=policy.issuer or None,
                options={"require": ["exp"], "verify_exp": False})
        except jwt.InvalidAudienceError:
            raise _invalid("the token is not meant for this cluster (aud)") from None
        except jwt.InvalidIssuerError:
            raise _invalid("the token has the wrong issuer (iss)") from None
        except jwt.MissingRequiredClaimError:
            raise _invalid("the token lacks a required claim (exp, aud or iss)") from None
        except Exception as exc:
            # Whatever PyJWT raises on a hostile token (its own errors, or a
            # TypeError/ValueError from a claim of the wrong type) is a refusal,
            # never UNKNOWN; its text stays in our log, not in the caller's answer.
            log.debug("refused a JWT: %r", exc)
            raise _invalid("invalid token") from None
        self._check_exp(claims.get("exp"))
        tenant = claims.get("tenant") or claims.get("sub")
        if not isinstance(tenant, str) or not tenant or SEPARATOR in tenant:
            raise _invalid("the token names no valid tenant")
        role = claims.get("role", Role.CLIENT.value)
        if not isinstance(role, str) or role not in _ROLES:
            raise _invalid("the token's role is neither 'admin' nor 'client'")
        return Principal(tenant, Role(role))

    def _check_exp(self, exp: object) -> None:
        # bool is an int subclass: refuse it explicitly.
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise _invalid("the token's exp is not a number")
        if isinstance(exp, float) and not math.isfinite(exp):  # json reads NaN, Infinity
            raise _invalid("the token's exp is not a number")
        try:
            expiry = float(exp)
        except OverflowError:  # an int too large for a float: as good as never
            expiry = math.inf
        now = self._clock()
        if expiry <= now - JWT_LEEWAY:
            raise _unauthenticated(Reason.TOKEN_EXPIRED, "the token has expired")
        limit = self._policy.max_lifetime
        if limit and expiry - now > limit:
            raise _invalid(f"the token's exp is more than {limit:g} seconds away")


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``token`` as a bearer on every unary and
    server-streaming call of a channel ([] for an empty token)."""
    if not token:
        return []
    return [_BearerUnary(token), _BearerStream(token)]


def _with_bearer(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
    metadata.append(bearer(token))
    return grpc.aio.ClientCallDetails(details.method, details.timeout,
                                      grpc.aio.Metadata(*metadata), details.credentials,
                                      details.wait_for_ready)


class _BearerUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        return await continuation(_with_bearer(client_call_details, self._token), request)


class _BearerStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any,
                                     request: Any) -> Any:
        return await continuation(_with_bearer(client_call_details, self._token), request)


def add_auth_flags(p: argparse.ArgumentParser) -> None:
    """The client authentication flags every server process (node, coordinator) takes."""
    p.add_argument("--auth-tokens", default=env("AUTH_TOKENS", ""),
                   help="file of '<token> <tenant> [admin|client]' lines accepted as bearer "
                        "tokens; the role defaults to client (MESH_AUTH_TOKENS)")
    p.add_argument("--auth-jwt-secret", default=env("AUTH_JWT_SECRET", ""),
                   help="file holding the HS256 secret of JWT bearer tokens "
                        "(MESH_AUTH_JWT_SECRET); with neither flag, no authentication")
    p.add_argument("--auth-jwt-audience", default=env("AUTH_JWT_AUDIENCE", ""),
                   help="JWTs must carry this 'aud' (MESH_AUTH_JWT_AUDIENCE)")
    p.add_argument("--auth-jwt-issuer", default=env("AUTH_JWT_ISSUER", ""),
                   help="JWTs must carry this 'iss' (MESH_AUTH_JWT_ISSUER)")
    p.add_argument("--auth-jwt-max-lifetime", type=float,
                   default=float(env("AUTH_JWT_MAX_LIFETIME", str(DEFAULT_JWT_MAX_LIFETIME))),
                   help="refuse JWTs whose exp is more than this many seconds away; 0 = no "
                        "limit (MESH_AUTH_JWT_MAX_LIFETIME)")


def jwt_policy(p: argparse.ArgumentParser, a: argparse.Namespace) -> JwtPolicy:
    """The JwtPolicy of flags added by ``add_auth_flags`` (exits on a bad value)."""
    if not a.auth_jwt_max_lifetime >= 0:  # also refuses nan
        p.error("--auth-jwt-max-lifetime must be 0 (no limit) or more")
    return JwtPolicy(audience=a.auth_jwt_audience, issuer=a.auth_jwt_issuer,
                     max_lifetime=a.auth_jwt_max_lifetime)
