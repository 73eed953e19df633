"""The event store's state machine without a network: decisions on a primary,
replay on a replica, retention, snapshots, and reading back from a real journal.
Time is a `ManualClock` (it stamps the commands; reads pass the instants they mean)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.clock import ManualClock
from common.errors import ServiceError
from common.tenancy import SEPARATOR
from mesh.events.v1 import events_pb2 as pb
from nodes.config import EventsLimits
from nodes.events import machine as machine_module
from nodes.events import primary as primary_module
from nodes.events.machine import EVENTS, EventsMachine
from nodes.events.model import CREATED_NS, POSITION, SEQ, STREAM, VERSION, event_record
from nodes.events.primary import EventsPrimary
from nodes.events.reads import View, read_slot, read_stream, record, recorded
from nodes.events.service import EventsService
from nodes.events.storage import SCHEMA, TABLES
from nodes.events.store import EventStore
from nodes.events.subscriptions import SlotTarget, SubscriptionHub, follow_slots, follow_stream
from nodes.replication.group import Group
from nodes.replication.journal import Journal
from tests.fakes import FakeJournal, Here
from tests.unit.test_replication_group import acked, replica_of

ANY = pb.EXPECTED_STATE_ANY
NO_STREAM = pb.EXPECTED_STATE_NO_STREAM
EXISTS = pb.EXPECTED_STATE_STREAM_EXISTS
EXACT = pb.EXPECTED_STATE_EXACT
CLOCK = ManualClock()  # never advanced: no timers here, and reads pass their own instants


def _group(journal: Any, node: str = "a", primary: bool = True, durable: Any = None,
           left: list[int] | None = None) -> Group:
    def factory(g: Group) -> EventsMachine:
        return EventsMachine(g, journal, left.append if left is not None else None)

    group = Group(5, node, {EVENTS: factory}, durable=durable, clock=CLOCK, journal=journal)
    if isinstance(journal, Journal):
        journal.on_flushed = lambda ticket, _groups: group.mark_flushed(ticket)
    if primary:
        group.become_primary(1)
    return group


def _machine(group: Group) -> EventsMachine:
    machine = group.machines[EVENTS]
    assert isinstance(machine, EventsMachine)
    return machine


def _primary(group: Group) -> EventsPrimary:
    """The group's event store as its primary decides on it (``.store``, ``.machine``)."""
    return EventsPrimary(group, _machine(group))


def _events(*ids: str, size: int = 1) -> list[pb.EventData]:
    return [pb.EventData(id=i, type="T", data=b"x" * size) for i in ids]


def _state(store: EventStore) -> tuple[Any, ...]:
    """Everything a copy's store holds, comparable across copies."""
    streams = sorted((s.stream_id, s.slot, s.last_version, s.max_count, s.max_age_ns,
                      s.truncate_before, s.metadata_version, s.state, sorted(s.ids))
                     for s in store.streams.values())
    logs = sorted((log.slot, log.last_position,
                   [event_record(e).SerializeToString() for e in log.entries if store.stored(e)])
                  for log in store.slots.values())
    return streams, logs


def _untracked(store: EventStore) -> None:
    """The garbage collector leaves every stored event alone (see StoredEvent)."""
    gc.collect()
    events = [e for s in store.streams.values() for e in s.events]
    events += [e for log in store.slots.values() for e in log.entries]
    assert events and not any(gc.is_tracked(e) for e in events)


def _replay(primary: Group, replica: Group, after: int = 0) -> None:
    for command in primary.log.since(after, 100_000):
        _machine(replica).apply(command)


def _code(exc: pytest.ExceptionInfo[ServiceError]) -> tuple[grpc.StatusCode, str]:
    return exc.value.code, exc.value.reason.value


def test_append_numbers_versions_and_positions_and_replicas_agree() -> None:
    primary, replica = _group(FakeJournal()), _group(FakeJournal(), "b", primary=False)
    m = _primary(primary)
    first = m.append("{t}-a", _events("1", "2"), ANY, 0)
    second = m.append("{t}-b", _events("3"), ANY, 0)
    third = m.append("{t}-a", _events("4"), ANY, 0)
    assert (first.first_version, first.last_version, first.position) == (1, 2, 2)
    assert (second.first_version, second.position) == (1, 3)  # same slot: one log
    assert (third.first_version, third.position) == (3, 4)
    assert first.slot == second.slot == third.slot and not first.duplicate
    _replay(primary, replica)
    assert _state(_machine(replica).store) == _state(m.store)
    _untracked(m.store)
    _untracked(_machine(replica).store)
    created = {e[CREATED_NS] for e in m.store.streams["{t}-a"].events}
    issued = {c.issued_at.ToNanoseconds() for c in primary.log.since(0, 10)}
    assert created <= issued  # the command's time, not the applier's clock


def test_an_identical_retry_is_a_duplicate_and_writes_nothing() -> None:
    journal = FakeJournal()
    m = _primary(_group(journal))
    original = m.append("s", _events("a", "b", "c"), NO_STREAM, 0)
    writes = len(journal.writes)
    # Before the expected-state check: an EXACT retry is not rejected because
    # the first attempt moved the version.
    retry = m.append("s", _events("a", "b", "c"), EXACT, 7)
    assert retry.duplicate and retry.seq == original.seq
    assert (retry.first_version, retry.last_version, retry.position) == (1, 3, 3)
    assert len(journal.writes) == writes
    m.append("s", _events("d"), ANY, 0)
    again = m.append("s", _events("b", "c"), ANY, 0)  # a contiguous part is fine too
    assert again.duplicate and (again.first_version, again.last_version) == (2, 3)


@pytest.mark.parametrize("ids", [["a", "new"], ["b", "a"], ["a", "c"]])
def test_partial_or_reordered_duplicates_are_refused(ids: list[str]) -> None:
    m = _primary(_group(FakeJournal()))
    m.append("s", _events("a", "b", "c"), ANY, 0)
    with pytest.raises(ServiceError) as exc:
        m.append("s", _events(*ids), ANY, 0)
    assert _code(exc) == (grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_EVENT_ID")
    assert m.store.streams["s"].last_version == 3


def test_expected_states() -> None:
    m = _primary(_group(FakeJournal()))
    with pytest.raises(ServiceError) as exc:
        m.append("s", _events("a"), EXISTS, 0)
    assert _code(exc) == (grpc.StatusCode.ABORTED, "VERSION_MISMATCH")
    assert exc.value.metadata == {"current_version": "0", "stream_exists": "false"}
    with pytest.raises(ServiceError):
        m.append("s", _events("a"), EXACT, 1)
    m.append("s", _events("a"), NO_STREAM, 0)
    with pytest.raises(ServiceError) as exc:
        m.append("s", _events("b"), NO_STREAM, 0)
    assert exc.value.metadata == {"current_version": "1", "stream_exists": "true"}
    m.append("s", _events("b"), EXISTS, 0)
    m.append("s", _events("c"), EXACT, 2)
    with pytest.raises(ServiceError) as exc:
        m.append("s", _events("d"), EXACT, 2)
    assert exc.value.metadata["current_version"] == "3"
    # A soft-deleted stream does not exist, and its versions go on.
    assert m.delete("s", EXACT, 3)[0] == 3
    with pytest.raises(ServiceError):
        m.append("s", _events("d"), EXISTS, 0)
    assert m.append("s", _events("d"), NO_STREAM, 0).first_version == 4


def test_retention_hides_at_once_and_scavenging_removes() -> None:
    journal = FakeJournal()
    group = _group(journal)
    m = _primary(group)
    m.append("s", _events(*"abcdef"), ANY, 0)
    m.set_metadata("s", (3, 0, 0), None)
    view = View(m.store, group.commit_seq, CLOCK.wall_ns())
    stream = m.store.streams["s"]
    page = read_stream(stream, view, None, False, 100)
    assert [e[VERSION] for e in page.events] == [4, 5, 6] and page.end
    assert [e[VERSION] for e in read_stream(stream, view, None, True, 2).events] == [6, 5]
    assert len(stream.events) == 6  # hidden, not yet removed
    assert m.scavenge(CLOCK.wall_ns()) == 1
    assert [e[VERSION] for e in stream.events] == [4, 5, 6] and set(stream.ids) == {"d", "e", "f"}
    assert any("DELETE FROM events_log" in sql for _, sql, _ in journal.writes)
    assert m.scavenge(CLOCK.wall_ns()) == 0  # nothing left to remove
    # max_age, on the primary's clock
    m.set_metadata("s", (0, 1_000_000_000, 0), 1)
    later = View(m.store, group.commit_seq, CLOCK.wall_ns() + 5_000_000_000)
    assert read_stream(stream, later, None, False, 100).events == []
    with pytest.raises(ServiceError) as exc:
        m.set_metadata("s", (0, 0, 0), 1)
    assert exc.value.metadata == {"current_version": "2"}


def test_soft_delete_tombstone_and_the_slot_log() -> None:
    group = _group(FakeJournal())
    m = _primary(group)
    m.append("{k}x", _events("a", "b"), ANY, 0)
    m.append("{k}y", _events("c"), ANY, 0)
    assert m.delete("{k}x", ANY, 0) == (2, group.log.last_seq)
    assert m.delete("{k}never", ANY, 0) == (0, 0)  # nothing to delete: no command
    slot = m.store.streams["{k}x"].slot
    view = View(m.store, group.commit_seq, CLOCK.wall_ns())
    page = read_slot(m.store.slots[slot], view, None, False, 100)
    assert [(e[STREAM], e[POSITION]) for e in page.events] == [("{k}y", 3)]
    assert m.append("{k}x", _events("d"), ANY, 0).first_version == 3
    assert m.tombstone("{k}y", ANY, 0)[0] == 1
    for call in (lambda: m.append("{k}y", _events("z"), ANY, 0),
                 lambda: m.tombstone("{k}y", ANY, 0),
                 lambda: m.set_metadata("{k}y", (0, 0, 0), None)):
        with pytest.raises(ServiceError) as exc:
            call()
        assert _code(exc) == (grpc.StatusCode.FAILED_PRECONDITION, "STREAM_DELETED")
    view = View(m.store, group.commit_seq, CLOCK.wall_ns())
    page = read_slot(m.store.slots[slot], view, None, True, 100)
    assert [(e[STREAM], e[VERSION]) for e in page.events] == [("{k}x", 3)]


def test_uncommitted_events_are_invisible() -> None:
    group = _group(FakeJournal())
    m = _primary(group)
    m.append("s", _events("a"), ANY, 0)
    m.append("s", _events("b", "c"), ANY, 0)
    stream = m.store.streams["s"]
    seq_first = stream.events[0][SEQ]
    view = View(m.store, seq_first, CLOCK.wall_ns())
    assert [e[VERSION] for e in read_stream(stream, view, None, False, 10).events] == [1]
    assert view.bounds(stream)[1] == 1
    assert m.store.slots[stream.slot].committed_last(seq_first) == 1


def test_pages_stop_at_the_byte_limit_but_hold_one_event() -> None:
    group = _group(FakeJournal())
    m = _primary(group)
    m.append("s", _events("a", "b", "c", size=1000), ANY, 0)
    view = View(m.store, group.commit_seq, CLOCK.wall_ns())
    stream = m.store.streams["s"]
    page = read_stream(stream, view, None, False, 100, max_bytes=2500)
    assert [e[VERSION] for e in page.events] == [1, 2] and page.next == 3 and not page.end
    page = read_stream(stream, view, 3, False, 100, max_bytes=10)
    assert [e[VERSION] for e in page.events] == [3] and page.end


def test_snapshot_then_restore_gives_the_same_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_module, "CHUNK_BYTES", 3000)  # several chunks per slot
    group = _group(FakeJournal())
    m = _primary(group)
    for i in range(20):
        m.append(f"{{one}}-{i % 3}", _events(f"id{i}", f"id{i}b", size=700), ANY, 0)
    m.append("other", _events("x"), ANY, 0)
    m.set_metadata("meta-only", (5, 0, 0), None)
    m.tombstone("{one}-2", ANY, 0)
    chunks = m.machine.snapshot()
    assert len([c for c in chunks if c[0] == m.store.streams["{one}-0"].slot]) > 3
    journal = FakeJournal()
    copy = _group(journal, "b", primary=False)
    copy.install(group.log.last_epoch, group.log.last_seq,
                 [(EVENTS, slot, data) for slot, data in chunks])
    assert _state(_machine(copy).store) == _state(m.store)
    _untracked(_machine(copy).store)
    assert journal.cleared == [TABLES]
    written = sum(len(rows) for _, sql, rows in journal.writes if "events_log" in sql)
    assert written == m.store.event_count
    assert {seq for seq, _, _ in journal.writes} == {group.log.last_seq}


async def test_a_restarted_node_reads_its_events_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "durable.sqlite3")
    journal.create_tables(SCHEMA, TABLES)
    journal.start()
    group = _group(journal)
    m = _primary(group)
    first = m.append("s", _events("a", "b"), ANY, 0)
    m.append("{s}-2", _events("c"), ANY, 0)
    m.set_metadata("s", (10, 0, 0), None)
    m.append("t", _events("d", "e"), ANY, 0)
    m.tombstone("t", ANY, 0)
    m.append("u", _events("f", "g", "h"), ANY, 0)
    m.delete("u", ANY, 0)
    m.set_metadata("u", (0, 0, 3), None)
    m.scavenge(CLOCK.wall_ns())
    await asyncio.wait_for(group.wait_committed(group.log.last_seq), 5)
    await journal.close()

    journal = Journal(tmp_path / "durable.sqlite3")  # the node restarts
    journal.create_tables(SCHEMA, TABLES)
    [copy] = journal.copies()
    restored = _group(journal, primary=False, durable=copy)
    r = _primary(restored)
    assert _state(r.store) == _state(m.store)
    assert r.store.event_count == m.store.event_count
    _untracked(r.store)
    restored.become_primary(2)
    retry = r.append("s", _events("a", "b"), EXACT, 9)  # the ids came back from disk
    assert retry.duplicate and retry.position == first.position
    assert r.append("s", _events("z"), ANY, 0).first_version == 3
    with pytest.raises(ServiceError):
        r.append("t", _events("y"), ANY, 0)
    await journal.close()


async def test_subscriptions_fall_behind_and_catch_up_without_gaps() -> None:
    group = _group(FakeJournal())
    m = _primary(group)
    hub = SubscriptionHub(10)
    for i in range(5):
        m.append("s", _events(f"a{i}"), ANY, 0)
    sub = hub.open(frozenset({group.group_id}))
    messages = follow_stream(sub, m.machine, "s", 2, max_lag=10, clock=CLOCK)
    kinds: list[str] = []
    versions: list[int] = []

    async def take(until: str) -> None:
        while True:
            message = await asyncio.wait_for(anext(messages), 2)
            kind = str(message.WhichOneof("content"))
            kinds.append(kind)
            if kind == "event":
                versions.append(message.event.version)
            if kind == until:
                return

    await take("caught_up")
    assert versions == [3, 4, 5] and kinds[-1] == "caught_up"
    for i in range(30):  # more than max_lag while the subscriber is not reading
        m.append("s", _events(f"b{i}"), ANY, 0)
    hub.notify(group.group_id)
    await take("caught_up")
    assert kinds.count("fell_behind") == 1 and kinds.count("caught_up") == 2
    assert versions == list(range(3, 36))
    hub.end_group(group.group_id)
    with pytest.raises(Exception, match=str(group.group_id)):
        await anext(messages)
    hub.close(sub)
    assert len(hub) == 0


async def test_category_subscriptions_checkpoint_every_interval() -> None:
    group = _group(FakeJournal())
    m = _primary(group)
    hub = SubscriptionHub(10)
    for i in range(10):
        m.append(f"{{c}}order-{i}" if i % 2 else f"{{c}}user-{i}", _events(f"e{i}"), ANY, 0)
    slot = m.store.streams["{c}order-1"].slot
    sub = hub.open(frozenset({group.group_id}))
    target = SlotTarget(group.group_id, m.machine, frozenset({slot}))
    messages = follow_slots(sub, [target], {slot: 0}, "{c}order-", 4, 1000, clock=CLOCK)
    seen: list[tuple[str, Any]] = []
    while not seen or seen[-1][0] != "caught_up":
        message = await asyncio.wait_for(anext(messages), 2)
        kind = str(message.WhichOneof("content"))
        value = (message.event.position if kind == "event" else
                 dict(getattr(message, kind).positions))
        seen.append((kind, value))
    assert seen == [("event", 2), ("event", 4), ("checkpoint", {slot: 4}), ("event", 6),
                    ("event", 8), ("checkpoint", {slot: 8}), ("event", 10),
                    ("caught_up", {slot: 10})]


def test_a_group_that_stops_leading_ends_its_subscriptions() -> None:
    left: list[int] = []
    group = _group(FakeJournal(), left=left)
    group.step_down(2, "test")
    assert left == [group.group_id]
    group.close("test")
    assert left == [group.group_id] * 2
    assert group.machines == {}


def test_a_scavenging_pass_looks_only_at_the_streams_due(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The scavenger finds the streams with something to remove through a schedule
    by due time: a pass looks at no stream whose retention hides nothing yet
    (each stream with a retention setting was looked at every pass before), and
    each stream still goes when it is due: over its count at once, by age at
    its oldest event's limit."""
    looked: list[str] = []
    real_first_kept = machine_module.first_kept

    def counting(stream: Any, commit_seq: int, now_ns: int) -> int:
        looked.append(stream.stream_id)
        return real_first_kept(stream, commit_seq, now_ns)

    monkeypatch.setattr(primary_module, "first_kept", counting)
    group = _group(FakeJournal())
    m = _primary(group)
    now, second, hour = CLOCK.wall_ns(), 10**9, 3600 * 10**9
    for i in range(100):
        m.append(f"aged-{i}", _events(f"a{i}"), ANY, 0)
        m.set_metadata(f"aged-{i}", (0, hour, 0), None)
    m.append("counted", _events("x", "y", "z"), ANY, 0)
    m.set_metadata("counted", (2, 0, 0), None)
    assert m.scavenge(now + second) == 1 and looked == ["counted"]
    looked.clear()
    assert m.scavenge(now + 2 * second) == 0 and looked == []  # nothing due
    m.append("counted", _events("w"), ANY, 0)  # over its count again: due at once
    assert m.scavenge(now + 3 * second) == 1 and looked == ["counted"]
    assert [e[VERSION] for e in m.store.streams["counted"].events] == [3, 4]
    looked.clear()
    assert m.scavenge(now + hour + second) == 100 and len(looked) == 100
    assert not any(m.store.streams[f"aged-{i}"].events for i in range(100))
    looked.clear()
    assert m.scavenge(now + 2 * hour) == 0 and looked == []
    # A new primary builds the schedule from its state and misses nothing.
    m.append("aged-0", _events("b0"), ANY, 0)
    group.step_down(2, "another primary")
    group.become_primary(3)
    assert m.scavenge(now + 3 * hour) == 1 and looked == ["aged-0"]


def test_a_stored_event_is_written_into_its_messages_wire_form_in_place() -> None:
    """`record` fills a response's own RecordedEvent: every field, the tenant's
    prefix taken off the stream, the default content type, the instant split."""
    tenant_stream = f"acme{SEPARATOR}order-7"
    stored = (tenant_stream, 3, 41, 900, "e-3", "Shipped", b"{}", b"m", "",
              1_733_440_000_123_456_789, 12)
    page = pb.ReadResponse()
    recorded([stored, (*stored[:8], "application/json", *stored[9:])], page.events)
    first, second = page.events
    assert (first.stream, first.version, first.slot, first.position, first.id, first.type,
            first.data, first.metadata) == ("order-7", 3, 41, 900, "e-3", "Shipped", b"{}", b"m")
    assert first.content_type == "application/octet-stream"
    assert second.content_type == "application/json"
    assert (first.create_time.seconds, first.create_time.nanos) == (1_733_440_000, 123_456_789)
    delivery = pb.SubscribeResponse()
    record(delivery.event, stored)
    assert delivery.event == first


async def test_stream_metadata_is_read_then_answered_once_committed() -> None:
    """GetStreamMetadata reads, then waits for the stream's settings as read to
    commit: settings changed during the wait (not yet committed) are not in the
    answer, and a group that leaves as the wait ends is not read again."""
    journal = FakeJournal()
    service = EventsService(EventsLimits(), journal)  # type: ignore[arg-type]
    group = Group(5, "a", {EVENTS: service.machine}, clock=CLOCK, journal=journal)
    group.become_primary(1)
    tracker = replica_of(group)
    service.start_routing(Here(group))  # type: ignore[arg-type]
    primary = EventsPrimary(group, _machine(group))
    primary.set_metadata("s", (3, 0, 0), None)  # proposed, not yet committed
    context: Any = None
    request = pb.GetStreamMetadataRequest(stream="s")
    call = asyncio.ensure_future(service.GetStreamMetadata(request, context))
    await asyncio.sleep(0)
    assert not call.done()  # waits for the settings it read to commit
    read_at = group.log.last_seq
    primary.set_metadata("s", (5, 0, 0), 1)  # changed during the wait
    acked(tracker, read_at)
    answer = await asyncio.wait_for(call, 1)
    assert answer.metadata.max_count == 3 and answer.metadata_version == 1

    call = asyncio.ensure_future(service.GetStreamMetadata(request, context))
    await asyncio.sleep(0)
    acked(tracker)
    group.close("the map moved the group to another node")
    answer = await asyncio.wait_for(call, 1)
    assert answer.metadata.max_count == 5 and answer.metadata_version == 2
