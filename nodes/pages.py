"""Pages of reads bounded in bytes as well as in count.

A page of up to 1,000 items whose payloads may each be a MiB (jobs, schedules,
publications, inbox items, events) could be more than a message holds, and an
answer too large to send fails the whole call. So a page also stops once its
items hold `MAX_PAGE_BYTES`; the caller goes on from the last item it got, as
from any page shorter than it asked for.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message

__all__ = ["MAX_PAGE_BYTES", "within_page"]

MAX_PAGE_BYTES = 3 << 20
"""Bytes of items one page holds at most (besides its first item, always there):
with the rest of the answer, within the 4 MiB a gRPC client takes by default
(grpcurl's, another language's)."""

V = TypeVar("V", bound=Message)


def within_page(items: list[V], max_bytes: int = MAX_PAGE_BYTES) -> list[V]:
    """The first of ``items`` that fit in ``max_bytes`` (at least one)."""
    size = 0
    for n, item in enumerate(items):
        size += item.ByteSize()
        if n and size > max_bytes:
            return items[:n]
    return items
