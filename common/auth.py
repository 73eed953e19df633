"""Bearer-token authentication: ``authorization: Bearer <token>`` -> the caller's tenant.

Two kinds of token, either or both (``--auth-tokens``, ``--auth-jwt-secret``):

- static tokens, from a file of ``<token> <tenant>`` lines (``#`` comments);
- HS256 JWTs signed with a shared secret (a file holding it), whose ``tenant``
  claim (else ``sub``) names the tenant; ``exp`` is required and checked, with
  a few seconds of leeway for clock skew.

With neither, authentication is off and every caller is the ``default``
tenant. A missing, malformed, expired or wrongly signed token is
UNAUTHENTICATED (reasons TOKEN_MISSING, TOKEN_INVALID, TOKEN_EXPIRED).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import grpc
import jwt

from common.errors import MeshStatusError, Reason
from common.tenancy import SEPARATOR

__all__ = ["DEFAULT_TENANT", "Authenticator", "bearer"]

DEFAULT_TENANT = "default"
JWT_LEEWAY = 5.0
"""Seconds of clock skew forgiven on ``exp``."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer(token: str) -> tuple[str, str]:
    """The metadata pair that carries ``token``."""
    return ("authorization", f"Bearer {token}")


def _unauthenticated(reason: Reason, why: str) -> MeshStatusError:
    return MeshStatusError(grpc.StatusCode.UNAUTHENTICATED, why, reason)


class Authenticator:
    """Turns a call's metadata into its tenant, or refuses it."""

    def __init__(self, tokens: Mapping[str, str] | None = None,
                 jwt_secret: bytes | None = None) -> None:
        # Keyed by digest: a dict lookup on the secret itself could leak, by its
        # timing, how much of a guess matched.
        self._tokens = {_digest(t): tenant for t, tenant in (tokens or {}).items()}
        self._secret = jwt_secret

    @classmethod
    def from_files(cls, tokens_file: str = "", secret_file: str = "") -> Authenticator | None:
        """From the flags' files; None when both are empty (authentication off)."""
        if not tokens_file and not secret_file:
            return None
        tokens: dict[str, str] = {}
        if tokens_file:
            for number, line in enumerate(Path(tokens_file).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or SEPARATOR in parts[1]:
                    raise ValueError(f"{tokens_file}:{number}: expected '<token> <tenant>'")
                tokens[parts[0]] = parts[1]
        secret = Path(secret_file).read_bytes().strip() if secret_file else None
        return cls(tokens, secret)

    def tenant(self, metadata: Mapping[str, str]) -> str:
        """The tenant of a call with ``metadata``; raises UNAUTHENTICATED."""
        header = metadata.get("authorization", "")
        if not header:
            raise _unauthenticated(Reason.TOKEN_MISSING,
                                   "no bearer token: send 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated(Reason.TOKEN_INVALID, "the authorization is not a bearer token")
        token = token.strip()
        tenant = self._tokens.get(_digest(token))
        if tenant is not None:
            return tenant
        if self._secret is not None and token.count(".") == 2:
            return self._jwt_tenant(token)
        raise _unauthenticated(Reason.TOKEN_INVALID, "unknown or malformed token")

    def _jwt_tenant(self, token: str) -> str:
        assert self._secret is not None
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], leeway=JWT_LEEWAY,
                                options={"require": ["exp"]})
        except jwt.ExpiredSignatureError:
            raise _unauthenticated(Reason.TOKEN_EXPIRED, "the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise _unauthenticated(Reason.TOKEN_INVALID, f"invalid token: {exc}") from None
        tenant = claims.get("tenant") or claims.get("sub")
        if not isinstance(tenant, str) or not tenant or SEPARATOR in tenant:
            raise _unauthenticated(Reason.TOKEN_INVALID, "the token names no valid tenant")
        return tenant
