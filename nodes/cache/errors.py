"""The refusals the cache store makes on purpose: one small hierarchy.

Each is a `ServiceError` value (the store knows nothing of gRPC); the node's
edge answers it with the status its reason stands for. Messages never quote
the key (it is the caller's input, and may be long); the attributes keep it.
"""

from __future__ import annotations

from common.errors import Reason, ServiceError

__all__ = ["CacheError", "CacheFullError", "IntegerOverflowError", "KeyExistsError",
           "NotAnIntegerError", "VersionMismatchError"]


class CacheError(ServiceError):
    """Base of every refusal the store makes on purpose."""


class KeyExistsError(CacheError):
    """An only_if_absent write met a live key."""

    def __init__(self, key: str) -> None:
        super().__init__("the key already exists", Reason.KEY_EXISTS)
        self.key = key


class VersionMismatchError(CacheError):
    """An only_if_version condition failed; ``current_version`` is 0 if the key is absent."""

    def __init__(self, key: str, current_version: int, expected_version: int) -> None:
        super().__init__(f"version mismatch: the key is at version {current_version}",
                         Reason.VERSION_MISMATCH, {"current_version": str(current_version)})
        self.key = key
        self.current_version = current_version
        self.expected_version = expected_version


class CacheFullError(CacheError):
    """The limits cannot be met by eviction; nothing was changed."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"cache is full and eviction cannot make room: {detail}",
                         Reason.CACHE_FULL)


class NotAnIntegerError(CacheError):
    """Incr met a value that is not a decimal signed 64-bit integer."""

    def __init__(self, key: str) -> None:
        why = "the value is not a decimal 64-bit integer"
        super().__init__(f"key: {why}", Reason.NOT_AN_INTEGER, {"field": "key"},
                         violations={"key": why})
        self.key = key


class IntegerOverflowError(CacheError):
    """Incr's result does not fit a signed 64-bit integer."""

    def __init__(self, key: str, current: int, delta: int) -> None:
        why = "the result would overflow 64 bits"
        super().__init__(f"delta: {why}", Reason.INTEGER_OVERFLOW, {"field": "delta"},
                         violations={"delta": why})
        self.key = key
