"""The command log: positions in its history, bounds, and resets after snapshots."""

from __future__ import annotations

import pytest

from mesh.replication.v1 import replication_pb2 as rpb
from nodes.replication.log import CommandLog


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
    log = CommandLog(capacity=5, max_bytes=1_000)
    for seq in range(1, 11):
        log.append(command(seq))
    assert (log.base_seq, log.last_seq) == (5, 10)
    assert not log.follows(1, 4) and log.follows(1, 5)
    big = CommandLog(capacity=100, max_bytes=250)
    for seq in range(1, 11):
        big.append(command(seq, size=100))
    assert big.last_seq - big.base_seq == 2
    with pytest.raises(ValueError):
        big.since(3, 10)  # before the log's start: needs a snapshot


def test_reset_after_a_snapshot() -> None:
    log = CommandLog()
    log.append(command(1))
    log.reset(3, 42)
    assert (log.last_epoch, log.last_seq) == (3, 42)
    assert log.follows(3, 42) and not log.follows(1, 1)
    log.append(command(43, epoch=3))
    assert log.last_seq == 43
