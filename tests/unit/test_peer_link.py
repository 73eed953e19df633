"""A replication link's messages stay within the peer plane's limit, whatever
gathered for the replica: a real `PeerLink` and its trackers, against a stream
that acknowledges every batch at once (no network)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.peer import NODE, PeerSigner
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication.group import Group
from nodes.replication.sender import MESSAGE_BYTES, PeerLink, Phase, ReplicaTracker
from tests.unit.test_replication_group import Link, Recorder

MIB = 1 << 20


class Replica:
    """The Replicate stream's other end: keeps every message and acknowledges each
    batch at once (a probe as a replica that holds nothing yet)."""

    def __init__(self) -> None:
        self.messages: list[rpb.ReplicateRequest] = []
        self.wrote = asyncio.Event()
        self._answers: asyncio.Queue[rpb.ReplicateResponse] = asyncio.Queue()

    def __call__(self, *args: Any, **kwargs: Any) -> Replica:  # the stub's Replicate
        return self

    async def write(self, request: rpb.ReplicateRequest) -> None:
        self.messages.append(request)
        self.wrote.set()
        acks = []
        for batch in request.batches:
            if batch.commands:
                last = batch.commands[-1]
                acks.append(rpb.Ack(group_id=batch.group_id, applied_epoch=last.epoch,
                                    applied_seq=last.seq, status=rpb.ACK_STATUS_OK))
            else:
                acks.append(rpb.Ack(group_id=batch.group_id,
                                    status=rpb.ACK_STATUS_POSITION_MISMATCH))
        self._answers.put_nowait(rpb.ReplicateResponse(acks=acks))

    def __aiter__(self) -> Replica:
        return self

    async def __anext__(self) -> rpb.ReplicateResponse:
        return await self._answers.get()

    def cancel(self) -> None:
        pass

    def received(self, group_id: int) -> list[int]:
        return [c.seq for m in self.messages for b in m.batches if b.group_id == group_id
                for c in b.commands]


class Channel:
    """Hands the stub the replica for every method."""

    def __init__(self, replica: Replica) -> None:
        self._replica = replica

    def __getattr__(self, method: str) -> Any:
        return lambda *args, **kwargs: self._replica


def primary(group_id: int, commands: int, size: int) -> Group:
    group = Group(group_id, "a", {rpb.SERVICE_KIND_CACHE: Recorder})
    group.become_primary(2)
    for i in range(commands):
        group.propose(0, rpb.SERVICE_KIND_CACHE, bytes([i]) * size)
    return group


@pytest.mark.timeout(30)
async def test_what_gathered_for_a_replica_goes_in_messages_of_bounded_size() -> None:
    # 3 groups with 6 MiB each waiting for the replica: one message of all of
    # it would be 18 MiB (and, in real use, past any limit the replica sets).
    replica = Replica()
    link = PeerLink("b", "b:1", Channel(replica), "a:1", PeerSigner(None, NODE, "a"))
    groups = [primary(g, 6, MIB) for g in (1, 2, 3)]
    for group in groups:
        ReplicaTracker(group, "b", link, in_sync=True)
    try:
        async with asyncio.timeout(10):
            while sum(len(replica.received(g)) for g in (1, 2, 3)) < 18:
                replica.wrote.clear()
                await replica.wrote.wait()
    finally:
        await link.close()
    for g in (1, 2, 3):
        assert replica.received(g) == [1, 2, 3, 4, 5, 6]  # each once, in order
    sizes = [sum(c.ByteSize() for b in m.batches for c in b.commands)
             for m in replica.messages]
    assert max(sizes) < MESSAGE_BYTES + MIB + 1024  # past the bound by one command at most
    assert sum(sizes) > 18 * MIB


def test_a_batch_stops_taking_commands_past_its_room() -> None:
    group = primary(1, 5, MIB)
    tracker = ReplicaTracker(group, "b", Link(), in_sync=True)  # type: ignore[arg-type]
    tracker.next_batch("a:1")  # the probe
    tracker.on_ack(rpb.Ack(group_id=1, status=rpb.ACK_STATUS_POSITION_MISMATCH))
    first = tracker.next_batch("a:1", room=2 * MIB)
    assert first is not None and [c.seq for c in first.commands] == [1, 2]
    assert tracker.sent_bytes >= 2 * MIB
    tracker.on_ack(rpb.Ack(group_id=1, applied_epoch=2, applied_seq=2,
                           status=rpb.ACK_STATUS_OK))
    # No room left still sends one command: a command never waits forever.
    second = tracker.next_batch("a:1", room=1)
    assert second is not None and [c.seq for c in second.commands] == [3]


@pytest.mark.timeout(30)
async def test_a_busy_group_does_not_keep_a_quiet_one_out_of_full_messages() -> None:
    # The busy group's 20 MiB fill five messages; the quiet group's command,
    # left out of the first full one, goes first in the next.
    replica = Replica()
    link = PeerLink("b", "b:1", Channel(replica), "a:1", PeerSigner(None, NODE, "a"))
    busy, quiet = primary(1, 20, MIB), primary(2, 1, 100)
    for group in (busy, quiet):
        ReplicaTracker(group, "b", link, in_sync=True)
    try:
        async with asyncio.timeout(10):
            while len(replica.received(1)) < 20 or not replica.received(2):
                replica.wrote.clear()
                await replica.wrote.wait()
    finally:
        await link.close()
    first = next(i for i, m in enumerate(replica.messages)
                 if any(b.group_id == 2 and b.commands for b in m.batches))
    assert first <= 2  # the probes; the first full message; then this one


class HeldReplica(Replica):
    """A replica whose acknowledgements wait while ``held``, until `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.held = False
        self._kept: list[rpb.ReplicateResponse] = []

    async def write(self, request: rpb.ReplicateRequest) -> None:
        await super().write(request)
        if self.held:
            self._kept.append(self._answers.get_nowait())

    def release(self) -> None:
        self.held = False
        for answer in self._kept:
            self._answers.put_nowait(answer)
        self._kept.clear()


@pytest.mark.timeout(30)
async def test_a_write_that_waited_for_the_window_goes_when_an_idle_group_is_acked() -> None:
    # Group 1's message holds the link's one-message window; group 2's write
    # waits for it. The ack frees the window while group 1 has nothing more to
    # send: group 2's write must still go (an ack wakes the send loop for any
    # tracker waiting, not only for its own group).
    replica = HeldReplica()
    link = PeerLink("b", "b:1", Channel(replica), "a:1", PeerSigner(None, NODE, "a"))
    one, two = primary(1, 0, 0), primary(2, 0, 0)
    for group in (one, two):
        group.trackers["b"] = ReplicaTracker(group, "b", link, in_sync=True)
    try:
        async with asyncio.timeout(10):
            for _ in range(100):  # the probes, answered at once
                if all(g.trackers["b"].phase is Phase.STREAM for g in (one, two)):
                    break
                await asyncio.sleep(0)
            assert all(g.trackers["b"].phase is Phase.STREAM for g in (one, two))
            replica.held = True
            first = one.propose(0, rpb.SERVICE_KIND_CACHE, b"x")
            while not replica.received(1):
                replica.wrote.clear()
                await replica.wrote.wait()
            second = two.propose(0, rpb.SERVICE_KIND_CACHE, b"y")
            for _ in range(10):
                await asyncio.sleep(0)
            assert replica.received(2) == []  # the window is full
            replica.release()
            await first.committed()
            for _ in range(20):  # loop turns, no network: the next send is due now
                await asyncio.sleep(0)
            assert replica.received(2) == [1]  # on the ack, not at the idle heartbeat
            await second.committed()
    finally:
        await link.close()
    assert replica.received(1) == [1] and replica.received(2) == [1]
