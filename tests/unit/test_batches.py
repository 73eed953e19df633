"""`nodes.batches.commit_all`: a batch's items answered by what their groups committed."""

from __future__ import annotations

import asyncio

from mesh.replication.v1 import replication_pb2 as rpb
from mesh.scheduler.v1 import scheduler_pb2 as pb
from nodes.batches import Waits, commit_all
from nodes.replication.group import Group
from nodes.replication.sender import ReplicaTracker
from tests.unit.test_replication_group import Link, group


def _primary(epoch: int = 1) -> tuple[Group, ReplicaTracker]:
    primary = group("a")
    primary.become_primary(epoch)
    tracker = ReplicaTracker(primary, "b", Link(), in_sync=True)  # type: ignore[arg-type]
    primary.trackers = {"b": tracker}
    return primary, tracker


def _propose(primary: Group, count: int) -> list[int]:
    return [primary.propose(0, rpb.SERVICE_KIND_CACHE, b"w").seq for _ in range(count)]


def _ack(tracker: ReplicaTracker, seq: int, epoch: int = 1) -> None:
    tracker.on_ack(rpb.Ack(group_id=1, epoch=epoch, applied_epoch=epoch, applied_seq=seq,
                           status=rpb.ACK_STATUS_OK))


async def test_a_group_lost_midway_fails_only_the_items_it_had_not_committed() -> None:
    primary, tracker = _primary()
    seqs = _propose(primary, 3)
    errors: dict[int, pb.ItemError] = {}
    waits: Waits = {primary: [(0, seqs[0]), (1, seqs[1]), (2, seqs[2])]}
    batch = asyncio.ensure_future(commit_all(waits, errors))
    await asyncio.sleep(0)
    _ack(tracker, seqs[0])
    await asyncio.sleep(0)
    assert not batch.done()  # the last item is not committed yet
    tracker.on_ack(rpb.Ack(group_id=1, status=rpb.ACK_STATUS_STALE_EPOCH, seen_epoch=2))
    await asyncio.wait_for(batch, 1)
    assert sorted(errors) == [1, 2]  # item 0 was held by the replica: it stands
    assert {e.reason for e in errors.values()} == {"NOT_COMMITTED"}
    assert errors[1].code == 14  # UNAVAILABLE: the outcome is unknown


async def test_each_group_answers_for_its_own_items() -> None:
    """A group already deposed when the batch waits fails its items at once; the
    other group's items are answered when it commits."""
    committed, tracker = _primary()
    deposed, _ = _primary()
    waits: Waits = {committed: [(0, _propose(committed, 1)[0])],
                    deposed: [(1, _propose(deposed, 1)[0])]}
    deposed.step_down(2, "a newer primary")
    errors: dict[int, pb.ItemError] = {}
    batch = asyncio.ensure_future(commit_all(waits, errors))
    await asyncio.sleep(0)
    assert not batch.done()
    _ack(tracker, committed.log.last_seq)
    await asyncio.wait_for(batch, 1)
    assert list(errors) == [1] and errors[1].reason == "NOT_COMMITTED"
