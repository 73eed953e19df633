"""The errors the cache store raises on purpose: one small hierarchy."""

from __future__ import annotations


class CacheError(Exception):
    """Base of every error the store raises on purpose."""


class KeyExistsError(CacheError):
    """An only_if_absent write met a live key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} already exists")
        self.key = key


class VersionMismatchError(CacheError):
    """An only_if_version condition failed; ``current_version`` is 0 if the key is absent."""

    def __init__(self, key: str, current_version: int, expected_version: int) -> None:
        super().__init__(f"key {key!r} is at version {current_version}, not {expected_version}")
        self.key = key
        self.current_version = current_version
        self.expected_version = expected_version


class CacheFullError(CacheError):
    """The limits cannot be met by eviction; nothing was changed."""


class NotAnIntegerError(CacheError):
    """Incr met a value that is not a decimal signed 64-bit integer."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the value of key {key!r} is not a decimal 64-bit integer")
        self.key = key


class IntegerOverflowError(CacheError):
    """Incr's result does not fit a signed 64-bit integer."""

    def __init__(self, key: str, current: int, delta: int) -> None:
        super().__init__(f"incrementing key {key!r} ({current}) by {delta} overflows 64 bits")
        self.key = key
