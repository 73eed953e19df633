"""Pattern subscriptions: every channel whose name matches, in the slots a node leads.

Names are tokens separated by "."; in a pattern "*" stands for exactly one
token and ">" (only last) for one or more, as NATS subjects. A subscription
with patterns covers a set of slots, each led by the node serving it (the
client splits the slot space by owner, as for event category subscriptions):
per group it keeps a `PatternWatch`, which finds the matching channels of the
group and gives the subscription one `Feed` per channel, and finds new ones
when the group creates channels (rescanning only then: the machine counts
the channels it ever created).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from common.tenancy import SEPARATOR
from mesh.notify.v1 import notify_pb2 as pb
from nodes.notify.feeds import Feed, open_feed
from nodes.notify.machine import NotifyMachine
from nodes.notify.model import CHANNEL, PRESENCE, LogKey

__all__ = ["PatternWatch", "matches"]

Pattern = tuple[str, ...]


def matches(pattern: Pattern, name: str) -> bool:
    """Whether channel ``name`` matches ``pattern`` (as tokens)."""
    tokens = name.split(".")
    for i, token in enumerate(pattern):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(pattern)


@dataclass(eq=False)
class PatternWatch:
    """The channels of one group that a pattern subscription follows."""

    machine: NotifyMachine
    slots: frozenset[int]
    patterns: Sequence[Pattern]
    prefix: str
    """The caller's tenant prefix ("" without tenants): only its channels match."""
    followed: set[LogKey]
    """Logs followed already (those the request names, and those found)."""
    from_start: bool
    presence_events: bool = False
    """Also follow the matching channels' presence events (joins and leaves)."""
    seen_created: int = field(default=-1)

    @property
    def group_id(self) -> int:
        return self.machine.group.group_id

    def discover(self, initial: bool = False
                 ) -> list[tuple[Feed, pb.SubscribeResponse | None]]:
        """Feeds for the matching channels not followed yet, each with the state to
        send first when it starts from now (``initial`` and not ``from_start``);
        the others start from their first offset and say so when they begin.
        Presence events start from now if they existed at ``initial``, else from
        their first (they are new), and send no state."""
        machine = self.machine
        if machine.created == self.seen_created:
            return []
        self.seen_created = machine.created
        kinds = (CHANNEL, PRESENCE) if self.presence_events else (CHANNEL,)
        keys = [key for key in machine.logs if key[0] in kinds]
        keys.extend((CHANNEL, name) for name in machine.ephemeral)
        found: list[tuple[Feed, pb.SubscribeResponse | None]] = []
        for key in keys:
            kind, name = key
            if key in self.followed or not self._visible(name):
                continue
            log = machine.find(key)
            plain = name[len(self.prefix):]
            if log is None or log.slot not in self.slots or not any(
                    matches(p, plain) for p in self.patterns):
                continue
            self.followed.add(key)
            if kind == PRESENCE:
                feed = open_feed(machine, key, plain, None)[0] if initial \
                    else Feed(key, plain, machine, 0, "")
                found.append((feed, None))
            elif initial and not self.from_start:
                found.append(open_feed(machine, key, plain, None))
            else:
                found.append((Feed(key, plain, machine, 0, ""), None))
        return found

    def _visible(self, name: str) -> bool:
        if self.prefix:
            return name.startswith(self.prefix)
        return SEPARATOR not in name
