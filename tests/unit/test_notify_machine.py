"""Notifications without a network: the replicated logs (offsets, epochs,
idempotency, retention), replay on a replica, snapshots, and subscriptions'
recovery, replay-then-live and buffer limits. Time is a `ManualClock` (it stamps
the commands; retention is judged at the instants the tests pass)."""

from __future__ import annotations

import argparse
import asyncio
import gc
from pathlib import Path
from typing import Any, cast

import pytest

from common.clock import SECOND, ManualClock
from common.errors import Reason, ServiceError
from mesh.notify.v1 import notify_pb2 as pb
from mesh.notify.v1 import notify_replication_pb2 as npb
from nodes.config import NotifyLimits, _notify_flags, _notify_limits
from nodes.notify import machine as machine_module
from nodes.notify import primary as primary_module
from nodes.notify.feeds import SubscriptionHub, follow, open_feed, step
from nodes.notify.machine import NOTIFY, NotifyMachine
from nodes.notify.model import CHANNEL, CREATED_NS, INBOX, OFFSET, SEQ, LogKey
from nodes.notify.primary import NotifyPrimary, trim_of
from nodes.notify.service import NotifyService
from nodes.notify.storage import SCHEMA, TABLES
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from tests.fakes import FakeJournal, Here
from tests.unit.test_replication_group import acked, replica_of

DEFAULTS = npb.LogSettings(size=100, ttl_ns=600 * SECOND)


def _group(clock: ManualClock, node: str = "a", primary: bool = True) -> Group:
    journal = FakeJournal()
    group = Group(7, node, {NOTIFY: lambda g: NotifyMachine(g, journal)}, clock=clock,
                  journal=journal)
    if primary:
        group.become_primary(3)
    return group


def _machine(group: Group) -> NotifyMachine:
    machine = group.machines[NOTIFY]
    assert isinstance(machine, NotifyMachine)
    return machine


def _primary(group: Group) -> NotifyPrimary:
    return NotifyPrimary(group, _machine(group))


def _publish(group: Group, channel: str, *data: bytes, idempotency_id: str = "",
             settings: npb.LogSettings | None = None) -> list[int]:
    return [_primary(group).append(CHANNEL, channel, d, idempotency_id, settings,
                                   DEFAULTS).offset for d in data]


def _replay(primary: Group, replica: Group, after: int = 0) -> None:
    for command in primary.log.since(after, 100_000):
        _machine(replica).apply(command)


def _state(machine: NotifyMachine) -> list[Any]:
    return sorted((log.key, log.epoch, log.last_offset, log.read_cursor, log.size, log.ttl_ns,
                   [e[:SEQ] for e in log.entries])  # the seq: 0 once read back
                  for log in machine.logs.values())


def _untracked(machine: NotifyMachine) -> None:
    """The garbage collector leaves every entry alone (see `nodes.notify.model.Entry`)."""
    gc.collect()
    entries = [e for log in machine.logs.values() for e in log.entries]
    assert entries and not any(gc.is_tracked(e) for e in entries)


def _offsets(messages: list[pb.SubscribeResponse]) -> list[int]:
    return [m.publication.offset for m in messages if m.HasField("publication")]


def test_publish_numbers_offsets_and_a_replica_gets_the_same_log() -> None:
    clock = ManualClock()
    primary, replica = _group(clock), _group(clock, "b", primary=False)
    assert _publish(primary, "news", b"a", b"b") == [1, 2]
    clock.advance(SECOND)
    assert _publish(primary, "sport", b"c") == [1]
    _replay(primary, replica)
    assert _state(_machine(replica)) == _state(_machine(primary))
    _untracked(_machine(primary))
    _untracked(_machine(replica))
    news = _machine(primary).logs[(CHANNEL, "news")]
    sport = _machine(primary).logs[(CHANNEL, "sport")]
    # An epoch names the command that created the log: distinct per log, the same
    # on every copy.
    assert news.epoch != sport.epoch and news.epoch == "3.1"
    assert [e[CREATED_NS] for e in sport.entries] == [clock.wall_ns()]


def test_an_idempotency_id_publishes_once_while_the_entry_is_held() -> None:
    group = _group(ManualClock())
    first = _primary(group).append(CHANNEL, "c", b"x", "id-1", None, DEFAULTS)
    again = _primary(group).append(CHANNEL, "c", b"other", "id-1", None, DEFAULTS)
    assert (again.offset, again.epoch, again.duplicate) == (first.offset, first.epoch, True)
    assert again.seq == first.seq and group.log.last_seq == first.seq
    # Once retention removed the entry, the id is forgotten with it.
    _publish(group, "c", b"y", b"z", settings=npb.LogSettings(size=2, ttl_ns=SECOND))
    later = _primary(group).append(CHANNEL, "c", b"x", "id-1", None, DEFAULTS)
    assert not later.duplicate and later.offset == 4


def test_size_retention_keeps_the_newest_and_settings_are_replicated() -> None:
    clock = ManualClock()
    primary, replica = _group(clock), _group(clock, "b", primary=False)
    _publish(primary, "c", *(bytes([i]) for i in range(5)),
             settings=npb.LogSettings(size=3, ttl_ns=60 * SECOND))
    log = _machine(primary).logs[(CHANNEL, "c")]
    assert (log.earliest, log.last_offset, log.size) == (3, 5, 3)
    _replay(primary, replica)
    assert _state(_machine(replica)) == _state(_machine(primary))


def test_age_retention_is_decided_by_the_primary_and_replicated_as_a_trim() -> None:
    clock = ManualClock()
    primary, replica = _group(clock), _group(clock, "b", primary=False)
    settings = npb.LogSettings(size=100, ttl_ns=10 * SECOND)
    _publish(primary, "c", b"a", settings=settings)
    clock.advance(5 * SECOND)
    _publish(primary, "c", b"b", b"c")
    log = _machine(primary).logs[(CHANNEL, "c")]
    assert trim_of(log, clock.wall_ns(), 3600 * SECOND) is None  # nothing is 10 s old
    clock.advance(6 * SECOND)
    trim = trim_of(log, clock.wall_ns(), 3600 * SECOND)
    assert trim is not None and trim.before_offset == 2 and not trim.forget
    assert _primary(primary).trim(clock.wall_ns(), 3600 * SECOND) == 1
    assert log.earliest == 2
    _replay(primary, replica)
    assert _state(_machine(replica)) == _state(_machine(primary))
    # Empty and idle past its lifetime, a channel is forgotten (an inbox is not).
    _primary(primary).append(INBOX, "u", b"n", "", None, settings)
    clock.advance(20 * SECOND)
    assert _primary(primary).trim(clock.wall_ns(), 3600 * SECOND) == 2
    assert log.earliest == 4 and (CHANNEL, "c") in _machine(primary).logs
    clock.advance(3600 * SECOND)
    assert _primary(primary).trim(clock.wall_ns(), 3600 * SECOND) == 1
    assert list(_machine(primary).logs) == [(INBOX, "u")]
    _publish(primary, "c", b"new")
    assert _machine(primary).logs[(CHANNEL, "c")].epoch != log.epoch


def test_the_service_tick_trims_on_its_clock() -> None:
    clock = ManualClock()
    service = NotifyService(NotifyLimits(history_ttl=2.0), cast(Journal, FakeJournal()), clock)
    group = Group(1, "a", {NOTIFY: service.machine}, clock=clock, journal=FakeJournal())
    group.become_primary(1)
    NotifyPrimary(group, _machine(group)).append(
        CHANNEL, "c", b"x", "", None, service._defaults[CHANNEL])
    clock.advance(3 * SECOND)
    assert service.tick(group, clock.wall_ns()) is None
    assert not _machine(group).logs[(CHANNEL, "c")].entries


def test_snapshot_and_restore_keep_logs_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_module, "CHUNK_BYTES", 200)
    clock = ManualClock()
    group = _group(clock)
    _publish(group, "{s}a", *(b"x" * 40 for _ in range(10)), idempotency_id="")
    _primary(group).append(CHANNEL, "{s}b", b"y", "id-b", None, DEFAULTS)
    _primary(group).append(INBOX, "user", b"z", "", None, DEFAULTS)
    _primary(group).mark_read("user", 1)
    chunks = _machine(group).snapshot()
    assert len(chunks) > 3  # the long log spans several chunks
    copy = _group(clock, "b", primary=False)
    _machine(copy).restore(chunks)
    assert _state(_machine(copy)) == _state(_machine(group))
    _untracked(_machine(copy))
    assert _machine(copy).logs[(CHANNEL, "{s}b")].ids["id-b"][OFFSET] == 1


def test_inbox_read_cursor_only_moves_forward_up_to_the_last() -> None:
    group = _group(ManualClock())
    for data in (b"1", b"2", b"3"):
        _primary(group).append(INBOX, "u", data, "", None, DEFAULTS)
    log = _machine(group).logs[(INBOX, "u")]
    assert log.unread(group.commit_seq) == 3
    assert _primary(group).mark_read("u", 2)[0] == 2
    assert log.unread(group.commit_seq) == 1
    seq = group.log.last_seq
    assert _primary(group).mark_read("u", 1) == (2, seq)  # back: no command
    assert group.log.last_seq == seq
    assert _primary(group).mark_read("u", 99)[0] == 3
    assert log.unread(group.commit_seq) == 0
    assert _primary(group).mark_read("nobody", 5) == (0, 0)


def _open(group: Group, since: tuple[int, str] | None, key: LogKey = (CHANNEL, "c")
          ) -> tuple[Any, pb.ChannelState]:
    feed, state = open_feed(_machine(group), key, key[1], since)
    return feed, state.state


def test_a_subscription_recovers_from_the_history_or_says_it_cannot() -> None:
    group = _group(ManualClock())
    _publish(group, "c", *(bytes([i]) for i in range(6)),
             settings=npb.LogSettings(size=4, ttl_ns=60 * SECOND))  # holds 3..6
    epoch = _machine(group).logs[(CHANNEL, "c")].epoch
    feed, state = _open(group, (2, epoch))
    assert state.recovered and (state.offset, state.earliest_offset, state.epoch) == (2, 3, epoch)
    assert _offsets(step(feed, 100)[0]) == [3, 4, 5, 6]
    feed, state = _open(group, (1, epoch))  # 2 is gone
    assert not state.recovered and (state.offset, state.earliest_offset) == (2, 3)
    assert _offsets(step(feed, 100)[0]) == [3, 4, 5, 6]
    feed, state = _open(group, (5, "another-epoch"))
    assert not state.recovered and state.offset == 2
    feed, state = _open(group, None)  # from now on
    assert state.recovered and state.offset == 6 and step(feed, 100) == ([], False)
    feed, state = _open(group, (0, ""), (CHANNEL, "new"))  # not published to yet
    assert state.recovered and state.epoch == "" and state.offset == 0
    _publish(group, "new", b"first")
    messages, _ = step(feed, 100)
    assert messages[0].state.recovered and messages[0].state.epoch
    assert _offsets(messages) == [1]


def test_a_feed_is_ended_when_too_far_behind_or_when_retention_passes_it() -> None:
    group = _group(ManualClock())
    _publish(group, "c", b"a")
    feed, _ = _open(group, None)
    _publish(group, "c", *(b"x" for _ in range(5)))
    with pytest.raises(ServiceError) as info:
        step(feed, 4)
    assert info.value.reason is Reason.SUBSCRIBER_TOO_SLOW
    assert info.value.metadata == {"channel": "c", "offset": "1", "epoch": feed.epoch}
    assert _offsets(step(feed, 5)[0]) == [2, 3, 4, 5, 6]  # within its buffer: fine
    _publish(group, "c", *(b"y" for _ in range(120)))  # the default size is 100
    with pytest.raises(ServiceError, match="retention removed"):
        step(feed, 1000)


async def test_replay_then_live_has_no_gap_and_no_duplicate() -> None:
    group = _group(ManualClock())
    hub = SubscriptionHub(10)
    _publish(group, "c", *(b"old" for _ in range(300)), settings=npb.LogSettings(
        size=1000, ttl_ns=60 * SECOND))
    epoch = _machine(group).logs[(CHANNEL, "c")].epoch
    sub = hub.open(frozenset({group.group_id}))
    feed, state = open_feed(_machine(group), (CHANNEL, "c"), "c", (10, epoch))
    assert state.state.recovered
    received: list[int] = []

    async def consume() -> None:
        async for message in follow(sub, [feed], 10_000):
            received.append(message.publication.offset)
            if len(received) == 390:
                return

    task = asyncio.create_task(consume())
    for _ in range(10):  # publish while it replays and after it went live
        _publish(group, "c", *(b"new" for _ in range(10)))
        hub.notify(group.group_id)
        await asyncio.sleep(0)
    await asyncio.wait_for(task, 5)
    assert received == list(range(11, 401))
    hub.close(sub)


def test_an_ephemeral_channel_is_kept_on_the_primary_only_and_lost_with_the_role() -> None:
    clock = ManualClock()
    group = _group(clock)
    primary = _primary(group)
    seq = group.log.last_seq
    first = primary.publish("e", b"a", "", None, True, DEFAULTS, clock.wall_ns())
    second = primary.publish("e", b"b", "id", None, None, DEFAULTS, clock.wall_ns())
    again = primary.publish("e", b"b", "id", None, None, DEFAULTS, clock.wall_ns())
    assert (first.offset, second.offset, first.seq) == (1, 2, 0)
    assert again.duplicate and again.offset == 2
    assert group.log.last_seq == seq  # nothing was replicated
    assert _machine(group).snapshot() == []
    feed, state = open_feed(_machine(group), (CHANNEL, "e"), "e", (0, ""))
    assert state.state.recovered and _offsets(step(feed, 100)[0]) == [1, 2]
    # Retention by age works in place.
    clock.advance(700 * SECOND)
    _primary(group).trim(clock.wall_ns(), 3600 * SECOND)
    assert not _machine(group).ephemeral["e"].entries
    # Turned into a replicated channel: a new epoch, and subscribers are told.
    replicated = primary.publish("e", b"c", "", DEFAULTS, False, DEFAULTS, clock.wall_ns())
    assert replicated.seq and replicated.epoch != first.epoch and replicated.offset == 1
    messages, _ = step(feed, 100)
    assert not messages[0].state.recovered and _offsets(messages) == [1]
    # And back: the replicated history is forgotten (a command), a new epoch again.
    back = primary.publish("e", b"d", "", None, True, DEFAULTS, clock.wall_ns())
    assert (CHANNEL, "e") not in _machine(group).logs and back.epoch != first.epoch
    group.step_down(9, "another primary")
    assert _machine(group).ephemeral == {}


def _journal(path: Path) -> Journal:
    journal = Journal(path / "durable.sqlite3")
    journal.create_tables(SCHEMA, TABLES)
    return journal


async def test_a_restarted_node_reads_its_channels_inboxes_and_presence_back(
    tmp_path: Path
) -> None:
    clock = ManualClock()
    journal = _journal(tmp_path)
    journal.start()
    group = Group(7, "a", {NOTIFY: lambda g: NotifyMachine(g, journal)}, clock=clock,
                  journal=journal)
    journal.on_flushed = lambda ticket, _groups: group.mark_flushed(ticket)
    group.become_primary(1)
    primary = _primary(group)
    short = npb.LogSettings(size=3, ttl_ns=10 * SECOND)
    _publish(group, "news", b"a", idempotency_id="first")
    _publish(group, "news", *(b"x%d" % i for i in range(5)), settings=short)  # keeps 3
    _publish(group, "gone", b"g", settings=short)
    for data in (b"n1", b"n2", b"n3"):
        primary.append(INBOX, "user", data, "", None, DEFAULTS)
    primary.mark_read("user", 2)
    primary.join("room", "c1", "u", b"info", 30 * SECOND)
    primary.join("room", "c2", "", b"", 30 * SECOND)
    primary.leave("room", "c2")
    clock.advance(11 * SECOND)
    primary.trim(clock.wall_ns(), 3600 * SECOND)  # "gone" and "news" lose their entries
    clock.advance(3600 * SECOND)
    primary.trim(clock.wall_ns(), 3600 * SECOND)  # then the idle channels are forgotten
    _publish(group, "news", b"again")
    await asyncio.wait_for(group.wait_committed(group.log.last_seq), 5)
    await journal.close()

    journal = _journal(tmp_path)  # the node restarts
    [copy] = journal.copies()
    restored = Group(7, "a", {NOTIFY: lambda g: NotifyMachine(g, journal)}, clock=clock,
                     durable=copy, journal=journal)
    assert _state(_machine(restored)) == _state(_machine(group))
    _untracked(_machine(restored))
    assert (CHANNEL, "gone") not in _machine(restored).logs
    assert _machine(restored).presence.channels["room"].keys() == {"c1"}
    inbox = _machine(restored).logs[(INBOX, "user")]
    assert (inbox.read_cursor, inbox.last_offset) == (2, 3)
    restored.become_primary(2)
    again = _primary(restored).append(CHANNEL, "news", b"again", "", None, DEFAULTS)
    assert again.offset == 2 and again.epoch == _machine(group).logs[(CHANNEL, "news")].epoch
    await journal.close()


def test_node_flags_and_variables_set_the_limits_and_refuse_nonsense(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_NOTIFY_INBOX_SIZE", "7")
    p = argparse.ArgumentParser()
    _notify_flags(p, NotifyLimits())
    p.add_argument("--stream-heartbeat-interval", type=float, default=5.0)  # shared flag
    limits = _notify_limits(p, p.parse_args(["--notify-history-size", "5",
                                             "--notify-history-ttl", "2.5"]))
    assert (limits.history_size, limits.history_ttl, limits.inbox_size) == (5, 2.5, 7)
    for bad in (["--notify-history-size", "0"], ["--notify-history-size", "20000"],
                ["--notify-history-ttl", "0"], ["--notify-subscriber-buffer", "0"],
                ["--notify-trim-interval", "-1"]):
        with pytest.raises(SystemExit):
            _notify_limits(p, p.parse_args(bad))


def test_a_trim_pass_looks_only_at_the_logs_that_are_due(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention by age finds the logs to trim through a schedule by due time: a
    pass over a group holding many inboxes (never forgotten) and idle logs looks
    at none that is not due, and still trims each log when it is (a new entry in
    an empty log, a shorter ttl, a channel idle past its lifetime)."""
    looked: list[str] = []
    real_trim_of = primary_module.trim_of

    def counting(log: Any, now_ns: int, lifetime_ns: int) -> npb.TrimLog | None:
        looked.append(log.name)
        return real_trim_of(log, now_ns, lifetime_ns)

    monkeypatch.setattr(primary_module, "trim_of", counting)
    lifetime = 3600 * SECOND
    clock = ManualClock()
    group = _group(clock)
    primary = _primary(group)
    inboxes = npb.LogSettings(size=10, ttl_ns=100 * SECOND)
    for i in range(200):
        primary.append(INBOX, f"user-{i}", b"hi", "", None, inboxes)
    clock.advance(101 * SECOND)
    assert primary.trim(clock.wall_ns(), lifetime) == 200  # every inbox's entry expired
    looked.clear()
    _publish(group, "c", b"a", settings=npb.LogSettings(size=10, ttl_ns=50 * SECOND))
    clock.advance(10 * SECOND)
    assert primary.trim(clock.wall_ns(), lifetime) == 0
    assert looked == []  # 200 empty inboxes and a channel not yet due: none looked at
    # A shorter ttl makes the channel due sooner; a new entry in an empty inbox, too.
    _publish(group, "c", b"b", settings=npb.LogSettings(size=10, ttl_ns=5 * SECOND))
    primary.append(INBOX, "user-7", b"again", "", None, inboxes)
    clock.advance(6 * SECOND)
    assert primary.trim(clock.wall_ns(), lifetime) == 1  # "c": both entries, 16 s and 6 s old
    assert not _machine(group).logs[(CHANNEL, "c")].entries
    assert set(looked) == {"c"}
    clock.advance(95 * SECOND)
    assert primary.trim(clock.wall_ns(), lifetime) == 1  # user-7's entry, 101 s old
    assert not _machine(group).logs[(INBOX, "user-7")].entries
    # Empty and idle past its lifetime, the channel is forgotten; the inboxes stay.
    clock.advance(lifetime)
    looked.clear()
    assert primary.trim(clock.wall_ns(), lifetime) == 1
    assert (CHANNEL, "c") not in _machine(group).logs and looked == ["c"]
    assert sum(1 for kind, _ in _machine(group).logs if kind == INBOX) == 200
    # Ephemeral channels (the primary's alone, trimmed in place) go by their own
    # schedule: only the one due is looked at, and idle past its lifetime it goes.
    looked.clear()
    short = npb.LogSettings(size=10, ttl_ns=5 * SECOND)
    for i in range(50):
        primary.publish(f"e{i}", b"x", "", None, True, DEFAULTS, clock.wall_ns())
    primary.publish("brief", b"x", "", short, True, DEFAULTS, clock.wall_ns())
    clock.advance(6 * SECOND)
    assert primary.trim(clock.wall_ns(), lifetime) == 0  # nothing replicated to trim
    assert looked == ["brief"] and not _machine(group).ephemeral["brief"].entries
    clock.advance(lifetime)
    primary.trim(clock.wall_ns(), lifetime)
    assert "brief" not in _machine(group).ephemeral
    assert all(not log.entries for log in _machine(group).ephemeral.values())  # 600 s ttl


async def test_a_send_whose_group_leaves_as_it_commits_is_still_answered() -> None:
    """The message is committed: the answer's unread count must not be read from
    a group that left this node meanwhile (its machine is gone), nor the write
    reported as failed."""
    clock = ManualClock()
    journal = FakeJournal()
    service = NotifyService(NotifyLimits(), cast(Journal, journal), clock)
    group = Group(7, "a", {NOTIFY: service.machine}, clock=clock, journal=journal)
    group.become_primary(3)
    tracker = replica_of(group)
    service.start_routing(Here(group))  # type: ignore[arg-type]
    context: Any = None
    send = asyncio.ensure_future(service.Send(pb.SendRequest(user="u", data=b"hi"), context))
    await asyncio.sleep(0)
    assert not send.done()  # waits for the replica
    acked(tracker)
    group.close("the map moved the group to another node")
    answer = await asyncio.wait_for(send, 1)
    assert answer.cursor == 1 and answer.unread_count == 1
