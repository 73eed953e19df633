"""The command log: positions in its history, bounds (a node-wide byte budget
shared by every group's log), and resets after snapshots."""

from __future__ import annotations

import random

import pytest

from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication.log import ENTRY_OVERHEAD, CommandLog, LogBudget


def command(seq: int, epoch: int = 1, size: int = 10) -> rpb.Command:
    return rpb.Command(seq=seq, epoch=epoch, payload=b"x" * size)


def test_positions_in_the_history() -> None:
    log = CommandLog()
    for seq in range(1, 4):
        log.append(command(seq, epoch=1))
    log.append(command(4, epoch=2))
    assert (log.last_epoch, log.last_seq) == (2, 4)
    assert log.follows(0, 0) and log.follows(1, 3) and log.follows(2, 4)
    assert not log.follows(2, 3)  # seq 3 belongs to epoch 1: a diverged replica
    assert not log.follows(2, 5)  # ahead of us: diverged too
    assert [c.seq for c in log.since(2, 10)] == [3, 4]


def test_commands_must_be_consecutive() -> None:
    log = CommandLog()
    log.append(command(1))
    with pytest.raises(ValueError):
        log.append(command(3))


def test_bounded_by_count_and_bytes() -> None:
    log = CommandLog(capacity=5)
    for seq in range(1, 11):
        log.append(command(seq))
    assert (log.base_seq, log.last_seq) == (5, 10)
    assert not log.follows(1, 4) and log.follows(1, 5)
    one = len(command(1, size=100).SerializeToString()) + ENTRY_OVERHEAD
    big = CommandLog(capacity=100, budget=LogBudget(2 * one + 10))
    for seq in range(1, 11):
        big.append(command(seq, size=100))
    assert big.last_seq - big.base_seq == 2 and big.size == 2 * one
    with pytest.raises(ValueError):
        big.since(3, 10)  # before the log's start: needs a snapshot


def test_logs_share_the_nodes_budget_equally() -> None:
    one = len(command(1, size=100).SerializeToString()) + ENTRY_OVERHEAD
    budget = LogBudget(8 * one)
    first = CommandLog(budget=budget)
    for seq in range(1, 11):
        first.append(command(seq, size=100))
    assert first.last_seq - first.base_seq == 8  # alone: the whole budget
    second = CommandLog(budget=budget)
    for seq in range(1, 11):
        second.append(command(seq, size=100))
        first.append(command(seq + 10, size=100))
    # Two logs: half each (the first trims to its share as it appends).
    assert first.last_seq - first.base_seq == 4 and second.last_seq - second.base_seq == 4
    second.release()  # its group left the node
    second.release()  # twice changes nothing
    assert budget.logs == 1 and second.size == 0 and second.last_seq == 10
    for seq in range(21, 31):
        first.append(command(seq, size=100))
    assert first.last_seq - first.base_seq == 8


def _sixteen_logs() -> tuple[LogBudget, list[CommandLog]]:
    """Sixteen logs of one 100-byte command each, on a budget of 64 such
    commands: a share is 4. Seqs below 128 keep every entry the same size."""
    one = len(command(1, size=100).SerializeToString()) + ENTRY_OVERHEAD
    budget = LogBudget(64 * one)
    logs = [CommandLog(budget=budget) for _ in range(16)]
    for log in logs:
        log.append(command(1, size=100))
    return budget, logs


def test_a_busy_log_takes_what_idle_ones_leave() -> None:
    budget, logs = _sixteen_logs()
    busy, other = logs[0], logs[1]
    for seq in range(2, 120):
        busy.append(command(seq, size=100))
    # The fifteen others hold one entry each; the busy log holds the rest, give
    # or take the slack (4 entries): it gives back 8 whenever it is 4 over.
    assert 64 - 15 - 4 <= busy.last_seq - busy.base_seq <= 64 - 15 + 4
    # The work moves to another group: the first log, idle now, gives back as
    # the second grows, and the budget holds throughout.
    for seq in range(2, 120):
        other.append(command(seq, size=100))
        assert budget.used <= budget.total + budget.slack
    assert other.last_seq - other.base_seq >= 64 - 15 - 4 - 4
    assert busy.last_seq - busy.base_seq == 4  # down to its share, no further


def test_logs_written_in_turn_keep_even_lengths() -> None:
    _, logs = _sixteen_logs()
    busy = logs[:4]
    for seq in range(2, 120):
        for log in busy:
            log.append(command(seq, size=100))
        # Each holds about a quarter of what the idle ones leave: never cut to
        # its share because it happened to be written longest ago.
        assert min(log.last_seq - log.base_seq for log in busy) >= min(seq, 11), seq


def test_the_budget_holds_whatever_the_logs_do() -> None:
    rnd = random.Random(3)
    budget = LogBudget(5000)
    logs = [CommandLog(capacity=50, budget=budget) for _ in range(8)]
    for _ in range(3000):
        log = rnd.choice(logs)
        if rnd.random() < 0.02:
            log.reset(log.last_epoch, log.last_seq + 5)  # a snapshot
        else:
            log.append(command(log.last_seq + 1, size=rnd.choice([10, 50, 400])))
        assert budget.used == sum(log.size for log in logs)
        assert budget.used <= budget.total + budget.slack
        assert all(log.last_seq - log.base_seq <= 50 for log in logs)
    for log in logs[2:]:
        log.release()
    assert budget.used == logs[0].size + logs[1].size and budget.logs == 2


def test_commands_come_back_as_they_went_in() -> None:
    log = CommandLog()
    sent = rpb.Command(seq=1, slot=7, service=rpb.SERVICE_KIND_CACHE, payload=b"set",
                       epoch=3, traceparent="00-ab-cd-01")
    sent.issued_at.FromNanoseconds(1_700_000_000_123_456_789)
    log.append(sent)
    assert log.since(0, 10) == [sent]
    assert log.issued_at(1) == 1_700_000_000_123_456_789 and log.issued_at(2) is None
    batch = rpb.CommandBatch()
    for data in log.serialized_since(0, 10):
        batch.commands.add().MergeFromString(data)
    assert list(batch.commands) == [sent]


def test_reset_after_a_snapshot() -> None:
    log = CommandLog()
    log.append(command(1))
    log.reset(3, 42)
    assert (log.last_epoch, log.last_seq) == (3, 42)
    assert log.follows(3, 42) and not log.follows(1, 1)
    log.append(command(43, epoch=3))
    assert log.last_seq == 43


class _CountedBudget(LogBudget):
    __slots__ = ("passes",)

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.passes = 0

    def reclaim(self) -> None:
        self.passes += 1
        super().reclaim()


def test_commands_larger_than_a_share_are_kept_and_passes_stay_rare() -> None:
    budget = _CountedBudget(16_000)  # 1,000 bytes of slack; 1,000 bytes a share
    logs = [CommandLog(budget=budget) for _ in range(16)]
    for log in logs:  # each log's newest command is past its share
        log.append(command(1, size=1_500))
    budget.passes = 0
    for seq in range(2, 100):
        logs[0].append(command(seq, size=100))
    # Every log keeps its newest command, so the logs stay past the budget; a
    # pass runs once per slack's worth of appends, not on each one.
    assert all(log.last_seq - log.base_seq >= 1 for log in logs)
    appended = 98 * (len(command(2, size=100).SerializeToString()) + ENTRY_OVERHEAD)
    assert budget.used > budget.total
    assert 1 <= budget.passes <= appended // budget.slack + 1, budget.passes
