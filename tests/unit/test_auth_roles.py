"""Token roles and JWT checks (common.auth) and the admission layer's role check
(nodes.rpc), as pure logic: no processes, no network."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from common.auth import (
    Authenticator,
    JwtPolicy,
    Principal,
    Role,
    add_auth_flags,
    bearer,
    jwt_policy,
)
from common.errors import MeshStatusError, Reason
from mesh.admin.v1 import admin_pb2
from nodes import rpc

SECRET = b"a-secret-for-unit-tests-0123456789"
NOW = 1_700_000_000.0


def _auth(policy: JwtPolicy | None = None, tokens: dict[str, str | Principal] | None = None
          ) -> Authenticator:
    return Authenticator(tokens, SECRET, policy, clock=lambda: NOW)


def _jwt(**claims: Any) -> str:
    claims.setdefault("tenant", "acme")
    claims.setdefault("exp", NOW + 60)
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _raw_jwt(payload: str) -> str:
    """A JWT whose payload is ``payload`` verbatim (JSON PyJWT would not write)."""
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = jwt.utils.base64url_encode(payload.encode())
    signing_input = header + b"." + body
    signature = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).sign(
        signing_input, SECRET)
    return (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()


def _refusal(auth: Authenticator, token: str) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(MeshStatusError) as info:
        auth.principal(dict([bearer(token)]))
    return info.value.code, info.value.reason.value, info.value.message


def _reason(auth: Authenticator, token: str) -> str:
    code, reason, _ = _refusal(auth, token)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    return reason


# -- roles --------------------------------------------------------------------


def test_a_jwt_role_claim_is_admin_or_client_and_defaults_to_client() -> None:
    auth = _auth()
    assert auth.principal(dict([bearer(_jwt(role="admin"))])) == Principal("acme", Role.ADMIN)
    assert auth.principal(dict([bearer(_jwt(role="client"))])) == Principal("acme", Role.CLIENT)
    assert auth.principal(dict([bearer(_jwt())])) == Principal("acme", Role.CLIENT)
    assert auth.tenant(dict([bearer(_jwt(role="admin"))])) == "acme"
    for bad in ("root", "Admin", "", ["admin"], True, 1, None):
        assert _reason(auth, _jwt(role=bad)) == "TOKEN_INVALID", bad


def test_the_tokens_file_has_an_optional_role_column(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# token tenant [role]\n"
                      "t-plain acme\n"
                      "t-client acme client  # a comment\n"
                      "t-admin ops admin\n")
    auth = Authenticator.from_files(str(tokens))
    assert auth is not None
    assert auth.principal(dict([bearer("t-plain")])) == Principal("acme", Role.CLIENT)
    assert auth.principal(dict([bearer("t-client")])) == Principal("acme", Role.CLIENT)
    assert auth.principal(dict([bearer("t-admin")])) == Principal("ops", Role.ADMIN)
    assert auth.principal(dict([bearer("t-admin")])).is_admin


@pytest.mark.parametrize("line, complaint", [
    ("t1 acme root", "unknown role 'root'"),
    ("t1 acme ADMIN", "unknown role 'ADMIN'"),
    ("t1 acme admin extra", "expected '<token> <tenant> [admin|client]'"),
    ("t1", "expected '<token> <tenant> [admin|client]'"),
])
def test_a_bad_tokens_line_is_refused_with_its_file_and_line(
        tmp_path: Path, line: str, complaint: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ok acme\n\n{line}\n")
    with pytest.raises(ValueError) as info:
        Authenticator.from_files(str(tokens))
    assert str(info.value).startswith(f"{tokens}:3: ")
    assert complaint in str(info.value)


# -- JWT claims ------------------------------------------------------------------


def test_audience_and_issuer_are_checked_when_configured() -> None:
    auth = _auth(JwtPolicy(audience="mesh-prod", issuer="https://idp.example"))
    good = _jwt(aud="mesh-prod", iss="https://idp.example")
    assert auth.principal(dict([bearer(good)])).tenant == "acme"
    assert auth.principal(dict([bearer(_jwt(aud=["other", "mesh-prod"],
                                             iss="https://idp.example"))])).tenant == "acme"
    for token in (_jwt(aud="mesh-dev", iss="https://idp.example"),
                  _jwt(iss="https://idp.example"),                   # no aud
                  _jwt(aud="mesh-prod", iss="https://evil.example"),
                  _jwt(aud="mesh-prod"),                             # no iss
                  _raw_jwt(json.dumps({"tenant": "acme", "exp": NOW + 60, "aud": "mesh-prod",
                                       "iss": ["https://idp.example"]})),
                  _jwt(aud={"x": 1}, iss="https://idp.example")):
        assert _reason(auth, token) == "TOKEN_INVALID"


def test_without_an_audience_configured_a_token_naming_one_is_refused() -> None:
    # A token minted for another service must not be replayable here.
    assert _reason(_auth(), _jwt(aud="some-other-service")) == "TOKEN_INVALID"
    assert _auth().principal(dict([bearer(_jwt(iss="anyone"))])).tenant == "acme"


@pytest.mark.parametrize("exp", [str(int(NOW + 60)), "soon", [NOW + 60], {"t": 1}, True,
                                 False, None])
def test_exp_must_be_a_number(exp: Any) -> None:
    assert _reason(_auth(), _jwt(exp=exp)) == "TOKEN_INVALID"


@pytest.mark.parametrize("payload", [
    '{"tenant": "acme", "exp": NaN}',
    '{"tenant": "acme", "exp": Infinity}',
    '{"tenant": "acme", "exp": 1e999}',
    '{"tenant": "acme", "exp": 10000000000, "iat": [1]}',
    '{"tenant": "acme", "exp": 10000000000, "nbf": {"a": 1}}',
    '{"tenant": "acme", "exp": 10000000000, "sub": 5}',
    '["not", "an", "object"]',
])
def test_hostile_claims_are_token_invalid_never_an_escaping_error(payload: str) -> None:
    auth = _auth(JwtPolicy(max_lifetime=0))
    assert _reason(auth, _raw_jwt(payload)) == "TOKEN_INVALID"


def test_exp_is_bounded_by_the_max_lifetime() -> None:
    auth = _auth(JwtPolicy(max_lifetime=3600))
    assert auth.principal(dict([bearer(_jwt(exp=NOW + 3500))])).tenant == "acme"
    assert _reason(auth, _jwt(exp=NOW + 3700)) == "TOKEN_INVALID"
    assert _reason(auth, _jwt(exp=10**30)) == "TOKEN_INVALID"
    assert _reason(_auth(), _jwt(exp=NOW + 365 * 86400)) == "TOKEN_INVALID"  # default: 30 days
    unlimited = _auth(JwtPolicy(max_lifetime=0))
    assert unlimited.principal(dict([bearer(_jwt(exp=10**30))])).tenant == "acme"
    assert unlimited.principal(dict([bearer(_jwt(exp=10**400))])).tenant == "acme"


def test_an_expired_token_is_token_expired_with_a_little_leeway() -> None:
    assert _reason(_auth(), _jwt(exp=NOW - 60)) == "TOKEN_EXPIRED"
    assert _auth().principal(dict([bearer(_jwt(exp=NOW - 1))])).tenant == "acme"
    assert _reason(_auth(), _jwt(exp=NOW - 60.5)) == "TOKEN_EXPIRED"  # floats are numbers


def test_refusals_never_echo_the_library_error() -> None:
    auth = _auth(JwtPolicy(audience="mesh-prod"))
    tokens = [_jwt(aud="mesh-dev"), _jwt(exp=[1]), _raw_jwt('{"exp": 1e10, "iat": [1]}'),
              _jwt(role="root"), jwt.encode({"tenant": "a", "exp": NOW + 60}, b"x" * 32,
                                            algorithm="HS256"),
              _jwt(aud="mesh-prod") + "tampered"]
    fixed = {"invalid token", "unknown or malformed token",
             "the token is not meant for this cluster (aud)",
             "the token lacks a required claim (exp, aud or iss)",
             "the token's exp is not a number",
             "the token's role is neither 'admin' nor 'client'"}
    for token in tokens:
        _, _, message = _refusal(auth, token)
        assert message in fixed, message


# -- flags -----------------------------------------------------------------------


def test_the_shared_flags_read_mesh_environment_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_AUTH_JWT_AUDIENCE", "aud-from-env")
    monkeypatch.setenv("MESH_AUTH_JWT_MAX_LIFETIME", "60")
    p = argparse.ArgumentParser()
    add_auth_flags(p)
    a = p.parse_args(["--auth-jwt-issuer", "iss-from-flag"])
    assert jwt_policy(p, a) == JwtPolicy("aud-from-env", "iss-from-flag", 60.0)
    monkeypatch.delenv("MESH_AUTH_JWT_MAX_LIFETIME")
    p = argparse.ArgumentParser()
    add_auth_flags(p)
    assert jwt_policy(p, p.parse_args([])).max_lifetime == 30 * 86400
    with pytest.raises(SystemExit):
        jwt_policy(p, p.parse_args(["--auth-jwt-max-lifetime", "-1"]))


# -- admission ---------------------------------------------------------------------


class _Context:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


async def _admit(auth: Authenticator, token: str | None, admin: bool) -> None:
    context: Any = _Context(bearer(token)) if token is not None else _Context()
    await rpc._admit(context, auth, None, "Drain", admin)


async def test_admin_methods_need_the_admin_role() -> None:
    auth = Authenticator({"t-admin": Principal("ops", Role.ADMIN), "t-client": "acme"})
    await _admit(auth, "t-admin", admin=True)
    await _admit(auth, "t-client", admin=False)
    with pytest.raises(MeshStatusError) as info:
        await _admit(auth, "t-client", admin=True)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.reason == Reason.ADMIN_REQUIRED
    for token in (None, "nope"):
        with pytest.raises(MeshStatusError) as info:
            await _admit(auth, token, admin=True)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_add_service_refuses_an_unknown_admin_method() -> None:
    server = grpc.aio.server()
    service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    with pytest.raises(ValueError, match="Drian"):
        rpc.add_service(server, object(), service, admin_methods={"Drian"})


def test_tokens_expire_relative_to_the_real_clock_by_default() -> None:
    auth = Authenticator(None, SECRET)
    token = jwt.encode({"tenant": "acme", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    assert auth.principal(dict([bearer(token)])) == Principal("acme")
