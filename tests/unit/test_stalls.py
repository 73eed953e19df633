"""Replicas that stopped answering: a real `PeerLink` measuring the silence of a
replica that stops acknowledging, and `Stalls` deciding whom to report."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from common.peer import NODE, PeerSigner
from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication import sender
from nodes.replication.sender import PeerLink, ReplicaTracker
from nodes.stalls import Stalls
from tests.unit.test_peer_link import Channel, Replica, primary


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Return once ``condition()`` holds (polled: what it reads has no event)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not come true in time")


class SilentReplica(Replica):
    """Acknowledges like `Replica` while ``answering`` is set; holds every answer
    back meanwhile (a cut link: messages go out, nothing comes back)."""

    def __init__(self) -> None:
        super().__init__()
        self.answering = asyncio.Event()
        self.answering.set()

    async def __anext__(self) -> rpb.ReplicateResponse:
        answer = await super().__anext__()
        await self.answering.wait()
        return answer


@pytest.mark.timeout(30)
async def test_a_link_counts_how_long_its_replica_has_owed_an_answer() -> None:
    loop = asyncio.get_running_loop()
    replica = SilentReplica()
    link = PeerLink("b", "b:1", Channel(replica), "a:1", PeerSigner(None, NODE, "a"))
    group = primary(1, 1, 10)
    group.trackers["b"] = ReplicaTracker(group, "b", link, in_sync=True)
    try:
        async with asyncio.timeout(10):
            while len(replica.received(1)) < 1:  # the probe answered, the command sent
                replica.wrote.clear()
                await replica.wrote.wait()
            await _until(lambda: not link.unanswered_for(loop.time()))
        assert link.answered_at > 0
        replica.answering.clear()  # the link is cut
        replica.wrote.clear()
        group.propose(0, rpb.SERVICE_KIND_CACHE, b"x")
        async with asyncio.timeout(10):
            await replica.wrote.wait()
        sent = loop.time()
        await asyncio.sleep(0.2)
        assert link.unanswered_for(loop.time()) >= 0.2
        assert link.unanswered_for(sent + 7) >= 7
        replica.answering.set()  # healed: the answer comes, nothing is owed
        await _until(lambda: not link.unanswered_for(loop.time()))
        assert link.answered_at >= sent
    finally:
        await link.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("carrying", [True, False], ids=["carrying a group", "carrying none"])
async def test_an_idle_link_heartbeats_and_owes_from_an_unanswered_one(
        monkeypatch: pytest.MonkeyPatch, carrying: bool) -> None:
    """A link with nothing to send still learns that its node went silent: it
    sends an empty message every ``IDLE`` seconds, which the node answers like
    any other. So does a link that carries no group (each node keeps one to
    every other). Before, an idle link never owed anything, and a node cut off
    from this one was reported only if it held a copy of a group led here."""
    monkeypatch.setattr(sender, "IDLE", 0.1)
    loop = asyncio.get_running_loop()
    replica = SilentReplica()
    link = PeerLink("b", "b:1", Channel(replica), "a:1", PeerSigner(None, NODE, "a"))
    if carrying:
        group = primary(1, 1, 10)
        group.trackers["b"] = ReplicaTracker(group, "b", link, in_sync=True)
    else:
        link.start()

    def heartbeats() -> int:
        return sum(1 for m in replica.messages if not m.batches)

    try:
        # Idle, and answered (the last heartbeat's answer may still be on its way).
        await _until(lambda: heartbeats() >= 2 and not link.unanswered_for(loop.time()))
        replica.answering.clear()  # the link is cut
        cut = loop.time()
        before = heartbeats()
        await _until(lambda: heartbeats() > before)
        await asyncio.sleep(0.3)
        owed = link.unanswered_for(loop.time())
        assert 0.3 <= owed <= loop.time() - cut, owed
        replica.answering.set()  # healed
        await _until(lambda: not link.unanswered_for(loop.time()))
    finally:
        await link.close()


@dataclass
class FakeLink:
    owed: float = 0.0  # seconds of silence, as of every `now`
    answered_at: float = 0.0

    def unanswered_for(self, now: float) -> float:
        return self.owed


def _published(_: tuple[str, ...]) -> Awaitable[bool]:
    return asyncio.sleep(0, True)


async def test_stalls_reports_a_replica_silent_past_the_threshold_and_holds_it() -> None:
    links: dict[str, FakeLink] = {"b": FakeLink(), "c": FakeLink()}
    members = {"a": "a1", "b": "b1", "c": "c1"}
    stalls = Stalls(lambda: links, lambda: members, _published, threshold=5.0,
                    hold=30.0, interval=1.0)
    assert stalls.check(100.0) == ()
    links["b"].owed = 4.9
    assert stalls.check(101.0) == ()
    links["b"].owed = 5.0
    assert stalls.check(102.0) == ("b",)
    # Replaced: this node has no link to "b" any more; it stays reported for the hold.
    del links["b"]
    assert stalls.check(103.0) == ("b",)
    assert stalls.check(131.0) == ("b",)
    assert stalls.check(133.0) == ()
    # Seated again while the cut lasts: reported again; its link answering ends it.
    links["b"] = FakeLink(owed=6.0)
    stalls.check(134.0)
    assert stalls.check(135.0) == ("b",)
    links["b"] = FakeLink(owed=0.0, answered_at=135.5)
    assert stalls.check(136.0) == ()


async def test_a_replica_that_restarts_or_leaves_the_map_is_no_longer_reported() -> None:
    links: dict[str, FakeLink] = {"b": FakeLink(owed=9.0), "c": FakeLink(owed=9.0)}
    members = {"a": "a1", "b": "b1", "c": "c1"}
    stalls = Stalls(lambda: links, lambda: members, _published, threshold=5.0, interval=1.0)
    stalls.check(100.0)
    assert stalls.check(101.0) == ("b", "c")
    del links["b"], links["c"]
    members["b"] = "b2"  # a new process: whatever kept the old one silent
    del members["c"]  # its lease ran out: nothing of it to avoid
    assert stalls.check(102.0) == ()
    # A link to a node the map does not know yet is not reported either.
    links["d"] = FakeLink(owed=9.0)
    assert stalls.check(103.0) == ()


async def test_stalls_says_nothing_new_right_after_this_process_did_not_run() -> None:
    # A pause of this process (SIGSTOP, a blocked loop) makes every link look
    # silent until it reads the acks that came meanwhile: no report from that look.
    links = {"b": FakeLink(owed=9.0)}
    stalls = Stalls(lambda: links, lambda: {"b": "b1"}, _published, threshold=5.0,
                    interval=1.0)
    assert stalls.check(100.0) == ()  # the first look has nothing to compare with
    assert stalls.check(110.0) == ()  # 10 s since the last look
    assert stalls.check(111.0) == ("b",)


@pytest.mark.timeout(10)
async def test_stalls_publishes_changes_only_and_retries_a_failed_write() -> None:
    links = {"b": FakeLink(owed=9.0)}
    written: list[tuple[str, ...]] = []
    failures = [RuntimeError("etcd away")]

    async def publish(stalled: tuple[str, ...]) -> bool:
        if failures:
            raise failures.pop()
        written.append(stalled)
        return True

    stalls = Stalls(lambda: links, lambda: {"b": "b1"}, publish, threshold=5.0,
                    interval=0.01)
    stalls.start()
    try:
        await _until(lambda: bool(written))
        await asyncio.sleep(0.1)
        links["b"].answered_at = 1e12
        links["b"].owed = 0.0
        await _until(lambda: len(written) >= 2)
        await asyncio.sleep(0.1)
    finally:
        await stalls.close()
    assert written == [("b",), ()]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("failure", ["timeout", "not registered"])
async def test_a_write_whose_fate_is_unknown_is_made_again_once_the_set_is_back(
        failure: str) -> None:
    """A write that timed out may have landed, and one refused while the node's
    registration was lost is what its next registration holds: when the set
    then goes back to the last one known written, it is written again, or the
    registration would name a replica that answers again for ever."""
    links = {"b": FakeLink(owed=9.0)}
    registration: list[tuple[str, ...]] = [()]
    written: list[tuple[str, ...]] = []
    first = True

    async def publish(stalled: tuple[str, ...]) -> bool:
        nonlocal first
        registration[0] = stalled  # (it lands, or the next registration writes it)
        if first:
            first = False
            if failure == "timeout":
                raise TimeoutError()
            return False
        written.append(stalled)
        return True

    stalls = Stalls(lambda: links, lambda: {"b": "b1"}, publish, threshold=5.0,
                    interval=0.01)
    stalls.start()
    try:
        await _until(lambda: not first)
        links["b"].answered_at = 1e12  # answering again before the write is retried
        links["b"].owed = 0.0
        await _until(lambda: bool(written))
        await asyncio.sleep(0.1)
    finally:
        await stalls.close()
    assert registration == [()]
