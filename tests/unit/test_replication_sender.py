"""A PeerLink over a stand-in stream: concurrent writes of many groups towards one
replica travel in few messages and are acknowledged together, and nothing is
committed before its ack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.peer import PeerSigner
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication import sender
from nodes.replication.group import Group
from nodes.replication.sender import PeerLink, Phase, ReplicaTracker, SendCounts
from tests.unit.test_replication_group import Recorder

CACHE = rpb.SERVICE_KIND_CACHE
GROUPS = 8


class Stream:
    """A Replicate call: records what the primary writes; the test sends the acks."""

    def __init__(self) -> None:
        self.written: list[rpb.ReplicateRequest] = []
        self.responses: asyncio.Queue[rpb.ReplicateResponse] = asyncio.Queue()

    async def write(self, request: rpb.ReplicateRequest) -> None:
        self.written.append(request)

    def cancel(self) -> None:
        pass

    def __aiter__(self) -> AsyncIterator[rpb.ReplicateResponse]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[rpb.ReplicateResponse]:
        while True:
            yield await self.responses.get()


class Channel:
    """Enough of a grpc.aio channel for the stub: every Replicate call is `stream`."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def stream_stream(self, *_args: Any, **_kwargs: Any) -> Any:
        return lambda **_kw: self.stream

    def unary_unary(self, *_args: Any, **_kwargs: Any) -> Any:
        return None

    unary_stream = unary_unary


def ack_all(replicas: dict[int, Group], request: rpb.ReplicateRequest) -> rpb.ReplicateResponse:
    """The replicas apply every batch of ``request``: one response with every ack."""
    return rpb.ReplicateResponse(acks=[replicas[b.group_id].apply_batch(b)
                                       for b in request.batches])


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_concurrent_writes_of_many_groups_share_messages_and_acks() -> None:
    stream = Stream()
    counts = SendCounts()
    link = PeerLink("b", "b:1", Channel(stream), "a:1",
                    PeerSigner(None, "node", "a"), counts)
    primaries = {g: Group(g, "a", {CACHE: Recorder}) for g in range(1, GROUPS + 1)}
    replicas = {g: Group(g, "b", {CACHE: Recorder}) for g in primaries}
    try:
        for group in primaries.values():
            group.become_primary(1)
            group.trackers["b"] = ReplicaTracker(group, "b", link, in_sync=True)
        await settle()
        assert len(stream.written) == 1  # every group's probe in one message
        stream.responses.put_nowait(ack_all(replicas, stream.written[0]))
        await settle()

        # One write goes out at once, alone.
        first = primaries[1].propose(0, CACHE, b"first")
        await settle()
        assert len(stream.written) == 2
        assert [len(b.commands) for b in stream.written[1].batches] == [1]

        # While it is unacknowledged, 5 writes in each group wait for the next message.
        proposals = [primaries[g].propose(0, CACHE, f"{g}-{i}".encode())
                     for i in range(5) for g in primaries]
        await settle()
        assert len(stream.written) == 2
        waiting = asyncio.gather(*(p.committed() for p in proposals))
        await settle()
        assert not waiting.done()

        stream.responses.put_nowait(ack_all(replicas, stream.written[1]))
        await asyncio.wait_for(first.committed(), 1)
        await settle()
        assert len(stream.written) == 3  # all of them, one batch per group
        together = stream.written[2]
        assert sorted(b.group_id for b in together.batches) == sorted(primaries)
        assert sum(len(b.commands) for b in together.batches) == 5 * GROUPS
        assert not waiting.done()  # sent is not acknowledged

        stream.responses.put_nowait(ack_all(replicas, together))
        await asyncio.wait_for(waiting, 1)
        commands = 1 + 5 * GROUPS
        assert counts.messages == 3 and counts.commands == commands  # 41 commands, 3 messages
        assert counts.responses == 3 and counts.acks == counts.batches == 2 * GROUPS + 1
        for g, replica in replicas.items():
            recorder = replica.machines[CACHE]
            assert isinstance(recorder, Recorder)
            assert recorder.applied == ([b"first"] if g == 1 else []) + [
                f"{g}-{i}".encode() for i in range(5)]
    finally:
        await link.close()


async def test_a_detached_group_does_not_hold_the_link() -> None:
    """A group that leaves while its batch is out frees the window: the others go on."""
    stream = Stream()
    link = PeerLink("b", "b:1", Channel(stream), "a:1",
                    PeerSigner(None, "node", "a"))
    primaries = {g: Group(g, "a", {CACHE: Recorder}) for g in (1, 2)}
    replicas = {g: Group(g, "b", {CACHE: Recorder}) for g in primaries}
    try:
        for group in primaries.values():
            group.become_primary(1)
            group.trackers["b"] = ReplicaTracker(group, "b", link, in_sync=True)
        await settle()
        stream.responses.put_nowait(ack_all(replicas, stream.written[0]))
        await settle()
        primaries[1].propose(0, CACHE, b"gone")
        await settle()
        assert len(stream.written) == 2
        primaries[1].step_down(2, "moved")  # detaches its tracker; no ack will count
        later = primaries[2].propose(0, CACHE, b"later")
        await settle()
        assert len(stream.written) == 3 and stream.written[2].batches[0].group_id == 2
        stream.responses.put_nowait(ack_all(replicas, stream.written[2]))
        await asyncio.wait_for(later.committed(), 1)
    finally:
        await link.close()


async def test_an_install_never_acknowledged_is_probed_again_once_the_link_is_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica installing a snapshot acks its end later; if that ack never comes,
    the link, idle for ``IDLE`` seconds, probes the group again."""
    monkeypatch.setattr(sender, "IDLE", 0.05)
    stream = Stream()
    link = PeerLink("b", "b:1", Channel(stream), "a:1", PeerSigner(None, "node", "a"))
    primary = Group(1, "a", {CACHE: Recorder})
    try:
        primary.become_primary(1)
        tracker = primary.trackers["b"] = ReplicaTracker(primary, "b", link, in_sync=True)
        await settle()
        assert len(stream.written) == 1  # the first probe
        stream.responses.put_nowait(rpb.ReplicateResponse(acks=[rpb.Ack(
            group_id=1, epoch=1, status=rpb.ACK_STATUS_SNAPSHOTTING)]))
        await settle()
        assert tracker.phase is Phase.INSTALLING and len(stream.written) == 1
        deadline = asyncio.get_running_loop().time() + 5
        while len(stream.written) < 2:
            assert asyncio.get_running_loop().time() < deadline, "no second probe"
            await asyncio.sleep(0.01)
        (probe,) = stream.written[1].batches
        assert probe.group_id == 1 and not probe.commands and not probe.install_snapshot
        assert (tracker.phase, tracker.inflight) == (Phase.PROBE, True)
    finally:
        await link.close()
