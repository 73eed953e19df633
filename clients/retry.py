"""Retries for every call: redirects on WRONG_OWNER, backoff on UNAVAILABLE, one deadline.

The rules (``with_retries``):

- WRONG_OWNER (the node does not own the slot; the call was not executed): if
  the node's map epoch is newer than ours, re-read the map first (bounded by
  the deadline). Then hop at once, to the ``owner_address`` the node named
  (unless its map is older than ours) or by our map if that changed since the
  call was sent. At most ``MAX_HOPS`` hops in a row; after that, or when the
  refusal taught us nothing new (we would only ask the same node again), the
  refusal counts as UNAVAILABLE-not-executed.
- UNAVAILABLE: back off (exponential, full jitter), re-read the map, try again.
  Any call is retried when the node said it did not execute it (NO_MAP,
  GROUP_UNAVAILABLE, OWNERSHIP_EXPIRED, TOO_MANY_HOPS, SHUTTING_DOWN, a refused
  redirect);
  when the outcome is unknown (a connection error, NOT_COMMITTED) only calls
  that are safe to repeat are.
- CIRCUIT_OPEN (the node's breaker is open, see ``clients.breaker``): nothing
  was sent, so it is one more not-executed UNAVAILABLE; while the node stays
  silent each try fails at once instead of waiting on it, and the call ends
  when the map sends it elsewhere (a failover) or at its deadline.
- Nothing is sent, and no pause is taken, past the call's deadline.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from clients.breaker import CIRCUIT_OPEN
from clients.errors import MeshError, NoNodesError, UnavailableError

T = TypeVar("T")

MAX_HOPS = 3
"""Redirects followed in a row before backing off."""

NOT_EXECUTED_REASONS = frozenset({
    "NO_MAP", "GROUP_UNAVAILABLE", "OWNERSHIP_EXPIRED", "TOO_MANY_HOPS", "WRONG_OWNER",
    "SHUTTING_DOWN", CIRCUIT_OPEN,
})
"""UNAVAILABLE reasons that promise the call had no effect (WRONG_OWNER: after
the hop limit, re-raised as UNAVAILABLE)."""


@dataclass(frozen=True)
class Backoff:
    """Delays of ``initial * multiplier**n``, capped at ``maximum``, each drawn at random
    from [0, delay] so that clients retrying together spread out ("full jitter")."""

    initial: float = 0.05
    maximum: float = 1.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.maximum, self.initial * self.multiplier**attempt))


class Verdict(enum.Enum):
    """What a failed call means for a retry."""

    REDIRECT = "redirect"
    """WRONG_OWNER: not executed; another node owns the slot."""
    NOT_EXECUTED = "not_executed"
    """Unavailable, and certainly not applied: retry any call."""
    UNKNOWN = "unknown"
    """Unavailable, and it may have applied: retry only calls safe to repeat."""
    FINAL = "final"
    """An answer (bad input, a failed condition...): never retried here."""


def classify(error: MeshError) -> Verdict:
    if error.reason == "WRONG_OWNER" and not isinstance(error, UnavailableError):
        return Verdict.REDIRECT
    if isinstance(error, NoNodesError):  # raised before anything was sent
        return Verdict.NOT_EXECUTED
    if isinstance(error, UnavailableError):
        return Verdict.NOT_EXECUTED if error.reason in NOT_EXECUTED_REASONS else Verdict.UNKNOWN
    return Verdict.FINAL


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class WrongOwner:
    """The metadata of a WRONG_OWNER refusal (missing fields read as 0 / "")."""

    epoch: int
    """The refusing node's map epoch."""
    owner_address: str
    owner_node_id: str = ""
    slot: int = 0
    group_id: int = 0

    @classmethod
    def of(cls, error: MeshError) -> WrongOwner:
        m = error.metadata
        return cls(epoch=_int(m.get("epoch", "")), owner_address=m.get("owner_address", ""),
                   owner_node_id=m.get("owner_node_id", ""), slot=_int(m.get("slot", "")),
                   group_id=_int(m.get("group_id", "")))


@dataclass(frozen=True, slots=True)
class Hop:
    """Where to send a refused call next, at once."""

    address: str | None
    """The owner the refusing node named; None: route again by our (newer) map."""


def next_hop(
    refusal: WrongOwner, refused_by: str, sent_epoch: int, epoch_now: int, follow_hint: bool
) -> Hop | None:
    """The hop after a WRONG_OWNER, or None when nothing new was learned (back off).

    ``sent_epoch``: our map epoch when the call was sent; ``epoch_now``: after
    any refresh. ``follow_hint``: False for batches, whose keys span slots, so
    one slot's owner says nothing about the others.
    """
    # A node whose map is older than ours names an owner we already know better.
    if (follow_hint and refusal.owner_address and refusal.owner_address != refused_by
            and refusal.epoch >= epoch_now):
        return Hop(refusal.owner_address)
    if epoch_now > sent_epoch:
        return Hop(None)
    return None


class MapSource(Protocol):
    """What the retry loop needs from the mesh."""

    timeout: float

    @property
    def epoch(self) -> int:
        """Our map epoch (0: no map)."""
        ...

    async def refresh(self, timeout: float | None = None) -> None:
        """Re-read the map (and membership), giving up quietly after ``timeout``."""
        ...


Attempt = Callable[[float, "str | None"], Awaitable[T]]
"""``attempt(budget, address)``: one try with ``budget`` seconds left, sent to
``address`` if given (a redirect), else wherever the map routes it."""

_BACKOFF = Backoff()


async def with_retries(
    mesh: MapSource, attempt: Attempt[T], *, timeout: float | None, safe: bool,
    follow_hints: bool = True, backoff: Backoff = _BACKOFF,
) -> T:
    """Run ``attempt`` until it succeeds, fails for good, or the deadline passes.

    ``safe``: repeating the call cannot change its outcome (gets, unconditional
    sets, batches), so it is retried even when a failed try may have applied.
    Errors raised by ``attempt`` must be MeshErrors with ``address`` set to the
    node that answered.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (mesh.timeout if timeout is None else timeout)
    tries = hops = 0
    address: str | None = None
    while True:
        sent_epoch = mesh.epoch
        try:
            return await attempt(deadline - loop.time(), address)
        except MeshError as exc:
            error = exc
        address = None
        verdict = classify(error)
        if verdict is Verdict.REDIRECT:
            refusal = WrongOwner.of(error)
            if hops < MAX_HOPS:
                hops += 1
                if refusal.epoch > mesh.epoch:
                    await mesh.refresh(timeout=deadline - loop.time())
                hop = next_hop(refusal, error.address, sent_epoch, mesh.epoch, follow_hints)
                if hop is not None and deadline > loop.time():
                    address = hop.address
                    continue
            error = _unavailable(error, hops)
            verdict = Verdict.NOT_EXECUTED
        if verdict is Verdict.FINAL or (verdict is Verdict.UNKNOWN and not safe):
            raise error
        pause = backoff.delay(tries)
        tries += 1
        if loop.time() + pause >= deadline:
            raise error
        await asyncio.sleep(pause)
        await mesh.refresh(timeout=deadline - loop.time())
        if loop.time() >= deadline:  # the pause or the read overran it
            raise error
        hops = 0


def _unavailable(refusal: MeshError, hops: int) -> UnavailableError:
    """A WRONG_OWNER we stop following, as the not-executed UNAVAILABLE it amounts to."""
    error = UnavailableError(
        f"no owner accepted the call after {hops} redirect(s): {refusal.message}",
        code=grpc.StatusCode.UNAVAILABLE, reason="WRONG_OWNER", metadata=refusal.metadata)
    error.address = refusal.address
    error.__cause__ = refusal
    return error
