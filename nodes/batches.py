"""Batch calls (EnqueueBatch, HeartbeatBatch, CompleteBatch, AppendMany): each item
answered on its own.

An item is routed by its key (a queue, a job id) like a call of its own: the
items of groups this node leads are served here, the others are forwarded to
their owner in one sub-batch per owner, concurrently. Whatever refuses an item
(bad input, a service rule, a lost primary, a failed forward) becomes that
item's `ItemError`; only a malformed batch as a whole fails the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2

from common import tracing
from common.errors import MeshStatusError, ServiceError, capped, status_of
from nodes.replication.group import Group
from nodes.replication.manager import Redirect
from nodes.rpc import ForwardedError

__all__ = ["MAX_BATCH", "REFUSALS", "Refusal", "Routes", "Waits", "answer_all", "commit_all",
           "forward_shares", "item_error", "renumbered", "route_items", "settle", "uncommitted"]

MAX_BATCH = 1000
"""Items of one batch call at most."""

_DETAILS_KEY = "grpc-status-details-bin"


E = TypeVar("E", bound=message.Message)
"""A service's ItemError message (each package has its own, with the same fields:
code, reason, message, metadata, field_violations)."""


def item_error(error: BaseException, prefix: str = "", kind: type[E] | None = None) -> E:
    """An item's error (a ``kind`` message, the scheduler's ItemError by default)
    from what refused it; field names get ``prefix`` (e.g. ``jobs[3].``).
    Anything unexpected is re-raised by the caller's except."""
    cls: Any = kind if kind is not None else _default()
    if isinstance(error, ServiceError):
        error = status_of(error)
    if isinstance(error, MeshStatusError):
        made: E = cls(
            code=error.code.value[0], reason=str(error.reason), message=error.message,
            metadata=error.metadata,
            field_violations={f"{prefix}{f}": d for f, d in error.violations.items()})
        return made
    if isinstance(error, ForwardedError):
        forwarded: E = _forwarded(error.error, cls)
        return forwarded
    raise error


def renumbered(error: E, field: str, was: int, now: int) -> E:
    """An owner's item error, its fields renamed from the forwarded share's
    numbering (``jobs[was]``) to the caller's (``jobs[now]``)."""
    violations: Any = getattr(error, "field_violations")  # noqa: B009 - any ItemError
    old, new = f"{field}[{was}]", f"{field}[{now}]"
    if not any(name.startswith(old) for name in violations):
        return error
    out = type(error)()
    out.CopyFrom(error)
    out.ClearField("field_violations")
    renamed: Any = getattr(out, "field_violations")  # noqa: B009
    for name, description in violations.items():
        renamed[new + name[len(old):] if name.startswith(old) else name] = description
    return out


def _default() -> type[message.Message]:
    from mesh.scheduler.v1 import scheduler_pb2
    return scheduler_pb2.ItemError


def _forwarded(error: grpc.aio.AioRpcError, cls: Any) -> Any:
    """A whole forwarded share's failure, for each of its items."""
    code = error.code()
    out = cls(code=code.value[0], reason=code.name,
              message=capped(error.details() or code.name, 512))
    for key, value in error.trailing_metadata() or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                out.reason = info.reason
                out.metadata.update(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                out.field_violations.update({v.field: v.description
                                             for v in bad.field_violations})
    return out


REFUSALS = (MeshStatusError, ServiceError)
"""What refuses one item (and becomes its error) rather than the whole call."""
Refusal = MeshStatusError | ServiceError


@dataclass
class Routes:
    """A batch's items by where they are served: local groups, remote owners, or
    refused already (their error set)."""

    local: dict[int, tuple[Group, list[int]]] = field(default_factory=dict)
    remote: dict[str, tuple[Redirect, list[int]]] = field(default_factory=dict)


def route_items(keys: Sequence[str | None], resolve: Callable[[str], Group | Redirect],
                errors: dict[int, E], kind: type[E] | None = None) -> Routes:
    """Where each item goes; ``None`` keys (refused by validation) are skipped,
    and an item its owner lookup refuses (WRONG_OWNER for a caller that routes by
    itself, TOO_MANY_HOPS) gets that error in ``errors``."""
    routes = Routes()
    for i, key in enumerate(keys):
        if key is None:
            continue
        try:
            target = resolve(key)
        except MeshStatusError as exc:
            errors[i] = item_error(exc, kind=kind)
            continue
        if isinstance(target, Redirect):
            routes.remote.setdefault(target.owner_address, (target, []))[1].append(i)
        else:
            routes.local.setdefault(target.group_id, (target, []))[1].append(i)
    return routes


Waits = dict[Group, list[tuple[int, int]]]
"""A batch's commands proposed here: each group's items, as (index, seq of the
item's command); items sharing one command share its seq."""


async def uncommitted(waits: Waits) -> dict[int, Refusal]:
    """Wait until each group's changes are committed; the items a group could not
    commit (it stopped being their primary first), each with why (UNAVAILABLE,
    NOT_COMMITTED: outcome unknown). The items it had committed before stand:
    its commit point only moves forward, so its replicas hold them."""
    # A group commits in order: waiting for its last command is waiting for
    # them all, one future per group. The futures are awaited one after
    # another: the wait is the slowest group's either way, and a task per
    # group cost a busy node more CPU than anything else in a batch's wait.
    refused: dict[int, Refusal] = {}
    pending: list[tuple[asyncio.Future[None], Group, list[tuple[int, int]]]] = []
    try:
        for group, items in waits.items():
            if not items:
                continue
            try:
                future = group.committing(max(seq for _, seq in items))
            except REFUSALS as exc:
                refused.update((i, exc) for i, seq in items if seq > group.commit_seq)
                continue
            if future is not None:
                pending.append((future, group, items))
        with tracing.span("mesh.replicate.commit", groups=len(pending)):
            for future, group, items in pending:
                try:
                    await future
                except REFUSALS as exc:
                    refused.update((i, exc) for i, seq in items if seq > group.commit_seq)
    finally:
        for future, _, _ in pending:  # cancelled: let the groups drop the others
            future.cancel()
    return refused


async def commit_all(waits: Waits, errors: dict[int, E], kind: type[E] | None = None) -> None:
    """`uncommitted`, with each refused item's error (a ``kind``) in ``errors``."""
    for i, refusal in (await uncommitted(waits)).items():
        errors[i] = item_error(refusal, kind=kind)


async def forward_shares(routes: Routes,
                         send: Callable[[Redirect, list[int]], Awaitable[None]],
                         errors: dict[int, E], kind: type[E] | None = None) -> None:
    """Send each remote share (concurrently); a share whose forward fails gives
    its error to each of its items."""
    async def one(target: Redirect, indexes: list[int]) -> None:
        try:
            await send(target, indexes)
        except (*REFUSALS, ForwardedError) as exc:
            problem = item_error(exc, kind=kind)
            for i in indexes:
                errors[i] = problem

    await asyncio.gather(*(one(t, idx) for t, idx in routes.remote.values()))


async def settle(routes: Routes, waits: Waits,
                 forward: Callable[[Redirect, list[int]], Awaitable[Any]],
                 answers: dict[int, Any], errors: dict[int, E], outcome: str, field: str,
                 kind: type[E] | None = None) -> None:
    """A batch call's common end: wait until the local groups' changes are
    committed while each remote share is forwarded. ``forward(target, indexes)``
    sends a share and returns the owner's response, whose ``results`` answer it
    in order, each with ``outcome`` set or an ``error``; those land in ``answers``
    and ``errors``, the errors' fields renumbered from the share's ``field[k]``
    to the caller's ``field[i]``."""
    async def send(target: Redirect, indexes: list[int]) -> None:
        response = await forward(target, indexes)
        for k, (i, result) in enumerate(zip(indexes, response.results, strict=True)):
            if result.HasField(outcome):
                answers[i] = getattr(result, outcome)
            else:
                errors[i] = renumbered(result.error, field, k, i)

    if not routes.remote:  # the common case: no task needed
        await commit_all(waits, errors, kind)
        return
    await asyncio.gather(commit_all(waits, errors, kind),
                         forward_shares(routes, send, errors, kind))


R = TypeVar("R", bound=message.Message)


def answer_all(response: R, count: int, answers: dict[int, Any], errors: dict[int, Any],
               outcome: str) -> R:
    """``response`` with a result per item, in order: its error if it has one,
    else its answer (as ``outcome``)."""
    results: Any = getattr(response, "results")  # noqa: B009 - any batch response
    for i in range(count):
        if i in errors:
            results.add(error=errors[i])
        else:
            results.add(**{outcome: answers[i]})
    return response
