"""Subscriptions: catch-up then live, pulled from the committed state in memory.

A subscription keeps a cursor (a stream version, or a position per slot) and
loops: read what is committed after the cursor and send it, and once nothing
is left, send CaughtUp and sleep until a commit in one of its groups wakes it.
Appends only set a flag, so a slow subscriber never slows them; it simply
reads further behind, and once it is more than ``max_lag`` entries behind the
head while live it is told so (FellBehind) and catches up the same way, from
its cursor: nothing is dropped, and since it always reads committed state in
order after its cursor, nothing is repeated or skipped when it turns live.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from common import heartbeat as hb
from common.clock import SYSTEM_CLOCK, Clock
from mesh.events.v1 import events_pb2 as pb
from nodes.events import errors
from nodes.events.machine import EventsMachine
from nodes.events.model import POSITION, STREAM, StoredEvent
from nodes.events.reads import View, read_stream, record
from nodes.subscriptions import SHUTDOWN, Ended, Subscription, SubscriptionHub

__all__ = ["SHUTDOWN", "Ended", "SlotTarget", "Subscription", "SubscriptionHub",
           "follow_slots", "follow_stream", "start_version"]

BATCH = 512
"""Entries read per slot (or stream) per step, between checks of the subscription."""

_FELL_BEHIND = pb.SubscribeResponse(fell_behind=pb.FellBehind())


def _delivery(event: StoredEvent) -> pb.SubscribeResponse:
    """The message delivering ``event``, its event filled in place (not copied)."""
    message = pb.SubscribeResponse()
    record(message.event, event)
    return message


def _heartbeat() -> pb.SubscribeResponse:
    return pb.SubscribeResponse(heartbeat=pb.Heartbeat(server_time=hb.now()))


def start_version(machine: EventsMachine, stream_id: str, after_version: int,
                  from_end: bool) -> int:
    """The version a stream subscription starts after."""
    stream = machine.store.streams.get(stream_id)
    if after_version or not from_end or stream is None:
        return after_version
    return stream.committed_last(machine.group.commit_seq)


async def follow_stream(sub: Subscription, machine: EventsMachine, stream_id: str,
                        cursor: int, max_lag: int, heartbeat: float = 0.0,
                        clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[pb.SubscribeResponse]:
    """One stream's events after version ``cursor``: catch-up, CaughtUp, live (with a
    Heartbeat after every ``heartbeat`` seconds of nothing to send; 0: none); what
    retention hides is judged by ``clock``."""
    group, store = machine.group, machine.store
    live = False
    while True:
        sub.wake.clear()
        sub.check()
        stream = store.streams.get(stream_id)
        last = 0
        if stream is not None:
            commit = group.commit_seq
            if stream.tombstoned and stream.changed_seq <= commit:
                raise errors.stream_deleted(stream_id)
            view = View(store, commit, clock.wall_ns())
            page = read_stream(stream, view, cursor + 1, False, BATCH)
            last = view.bounds(stream)[1]
            if live and last - cursor > max_lag:
                yield _FELL_BEHIND
                live = False
            for event in page.events:
                yield _delivery(event)
            # Hidden versions count as passed, but never beyond what is committed.
            cursor = max(cursor, min(page.next - 1, last))
            if not page.end:
                continue
        if not live:
            yield pb.SubscribeResponse(caught_up=pb.CaughtUp(version=last))
            live = True
        while not await hb.idle(sub.wake, heartbeat):
            yield _heartbeat()


@dataclass(frozen=True, slots=True)
class SlotTarget:
    """The slots a category/all subscription reads in one group led here."""

    group_id: int
    machine: EventsMachine
    slots: frozenset[int]


async def follow_slots(sub: Subscription, targets: Sequence[SlotTarget],
                       cursors: dict[int, int], prefix: str, interval: int, max_lag: int,
                       heartbeat: float = 0.0, clock: Clock = SYSTEM_CLOCK
                       ) -> AsyncIterator[pb.SubscribeResponse]:
    """The events of the targets' slots after ``cursors`` (slot -> last position
    done) whose stream id starts with ``prefix``, with checkpoints (and a Heartbeat
    after every ``heartbeat`` seconds of nothing to send; 0: none); what retention
    hides is judged by ``clock``."""
    by_group = {t.group_id: t for t in targets}
    todo = set(by_group)
    advanced: dict[int, int] = {}
    scanned = 0
    live = False
    while True:
        sub.wake.clear()
        sub.check()
        todo |= sub.dirty
        sub.dirty.clear()
        if not todo:
            if not live:
                yield pb.SubscribeResponse(caught_up=pb.CaughtUp(positions=cursors))
                advanced.clear()
                scanned = 0
                live = True
            while not await hb.idle(sub.wake, heartbeat):
                yield _heartbeat()
            continue
        work, lag, todo = _collect([by_group[g] for g in todo], cursors, clock.wall_ns())
        if live and lag > max_lag:
            yield _FELL_BEHIND
            live = False
        for slot, batch, view in work:
            for event in batch:
                if event[STREAM].startswith(prefix) and view.visible(event):
                    yield _delivery(event)
                cursors[slot] = advanced[slot] = event[POSITION]
                scanned += 1
                if scanned >= interval:
                    yield pb.SubscribeResponse(checkpoint=pb.Checkpoint(positions=advanced))
                    advanced.clear()
                    scanned = 0


def _collect(targets: Sequence[SlotTarget], cursors: dict[int, int], now: int
             ) -> tuple[list[tuple[int, list[StoredEvent], View]], int, set[int]]:
    """The next batch of committed entries per slot of ``targets`` (as seen at wall
    instant ``now``), the entries they are behind in all, and the groups with more
    than one batch to read."""
    work: list[tuple[int, list[StoredEvent], View]] = []
    lag = 0
    more: set[int] = set()
    for target in targets:
        group, store = target.machine.group, target.machine.store
        commit = group.commit_seq
        view = View(store, commit, now)
        logs, wanted = store.slots, target.slots
        slots = wanted if len(wanted) < len(logs) else logs.keys()
        for slot in slots:
            log = logs.get(slot)
            if log is None or slot not in wanted:
                continue
            cursor = cursors[slot]
            if log.last_position <= cursor:
                continue
            start, end = log.index_after(cursor), log.committed_end(commit)
            if start >= end:
                continue
            lag += end - start
            if end - start > BATCH:
                end = start + BATCH
                more.add(target.group_id)
            work.append((slot, list(log.entries[start:end]), view))
    return work, lag, more
