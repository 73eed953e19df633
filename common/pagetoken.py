"""Opaque page tokens: every List call encodes and checks its tokens here.

A token is the position after the last item of a page (a few ints and strings)
with the name of the listing it belongs to and a short digest, as URL-safe
base64. Decoding refuses, with INVALID_ARGUMENT naming ``page_token``, anything
this module did not produce for that listing: garbage, a hand-edited token, or
one from another List call. The digest is not a secret (any node must accept
any other node's tokens, across failovers): it catches corruption and guesses,
and a forged token could only name a position the caller could reach by paging.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from common.errors import MeshStatusError, invalid_argument

__all__ = ["MAX_TOKEN_CHARS", "decode", "encode"]

MAX_TOKEN_CHARS = 2048
"""Longer than any token we make (ids are at most a few hundred bytes)."""
FIELD = "page_token"
_DIGEST_BYTES = 8
_VERSION = 1


def _digest(kind: str, body: bytes) -> bytes:
    # Keyed by the listing so that one listing's token is refused by another.
    return hashlib.blake2b(body, digest_size=_DIGEST_BYTES,
                           key=f"mesh-page-token:{kind}".encode()).digest()


def encode(kind: str, *parts: int | str) -> str:
    """The token for the position ``parts`` in the listing ``kind``."""
    body = json.dumps([_VERSION, kind, *parts], separators=(",", ":")).encode()
    raw = _digest(kind, body) + body
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _refused() -> MeshStatusError:
    return invalid_argument(FIELD, "is not a page token this call gave")


def decode(token: str, kind: str, shape: tuple[type[int] | type[str], ...]
           ) -> tuple[Any, ...] | None:
    """The position ``token`` holds (of the types in ``shape``); None for the
    empty token (the first page)."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise _refused()
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_",
                               validate=True)
    except (binascii.Error, ValueError):
        raise _refused() from None
    digest, body = raw[:_DIGEST_BYTES], raw[_DIGEST_BYTES:]
    if len(digest) != _DIGEST_BYTES or digest != _digest(kind, body):
        raise _refused()
    try:
        value = json.loads(body)
    except ValueError:
        raise _refused() from None
    if not isinstance(value, list) or value[:2] != [_VERSION, kind] \
            or len(value) != len(shape) + 2:
        raise _refused()
    parts = tuple(value[2:])
    # type() rather than isinstance(): JSON true/false are bools, which are ints.
    if any(type(part) is not want for part, want in zip(parts, shape, strict=True)):
        raise _refused()
    return parts
