"""Cron expressions: 5 and 6 fields (seconds first), names, steps, macros, the day
fields' classic OR, time zones and DST, and what is refused. Plus job ids that route."""

from __future__ import annotations

from datetime import datetime

import pytest

from common.slots import slot_for
from nodes.scheduler.cron import CronError, parse, zone
from nodes.scheduler.ids import job_id, slot_tag

S = 1_000_000_000


def _ns(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
        tz: str = "UTC") -> int:
    moment = datetime(year, month, day, hour, minute, second, tzinfo=zone(tz))
    return int(moment.timestamp()) * S


def _fires(expr: str, start: int, count: int, tz: str = "UTC") -> list[str]:
    cron, zone_ = parse(expr), zone(tz)
    out, t = [], start
    for _ in range(count):
        found = cron.next_after(t, zone_)
        assert found is not None
        out.append(datetime.fromtimestamp(found / S, zone_).strftime("%m-%d %H:%M:%S %Z"))
        t = found
    return out


def test_five_fields_fire_on_the_minute() -> None:
    start = _ns(2024, 1, 1, 10, 0, 30)
    assert _fires("*/15 10 * * *", start, 3) == [
        "01-01 10:15:00 UTC", "01-01 10:30:00 UTC", "01-01 10:45:00 UTC"]
    assert _fires("0 9 * * MON-FRI", _ns(2024, 1, 5, 12), 2) == [  # a Friday
        "01-08 09:00:00 UTC", "01-09 09:00:00 UTC"]


def test_six_fields_read_seconds_first() -> None:
    start = _ns(2024, 1, 1, 0, 0, 0)
    assert _fires("*/20 * * * * *", start, 4) == [
        "01-01 00:00:20 UTC", "01-01 00:00:40 UTC", "01-01 00:01:00 UTC",
        "01-01 00:01:20 UTC"]
    assert _fires("5 0 12 * * *", start, 1) == ["01-01 12:00:05 UTC"]
    assert _fires("* * * * * *", start + S // 2, 2) == [
        "01-01 00:00:01 UTC", "01-01 00:00:02 UTC"]  # strictly after, whole seconds


def test_lists_ranges_steps_names_and_macros() -> None:
    start = _ns(2024, 1, 1)
    assert _fires("0 0 1,15 feb,Mar *", start, 3) == [
        "02-01 00:00:00 UTC", "02-15 00:00:00 UTC", "03-01 00:00:00 UTC"]
    assert _fires("0 8-18/5 * * *", start, 3) == [
        "01-01 08:00:00 UTC", "01-01 13:00:00 UTC", "01-01 18:00:00 UTC"]
    assert _fires("0 0 * * 7", start, 1) == ["01-07 00:00:00 UTC"]  # 7 is Sunday too
    assert _fires("@monthly", start, 1) == ["02-01 00:00:00 UTC"]
    assert _fires("@hourly", start, 1) == ["01-01 01:00:00 UTC"]
    assert _fires("@weekly", start, 1) == ["01-07 00:00:00 UTC"]
    assert _fires("0 0 ? * SUN", start, 1) == ["01-07 00:00:00 UTC"]


def test_both_day_fields_restricted_means_either() -> None:
    # The 13th, or any Friday (classic cron).
    assert _fires("0 0 13 * FRI", _ns(2024, 9, 1), 3) == [
        "09-06 00:00:00 UTC", "09-13 00:00:00 UTC", "09-20 00:00:00 UTC"]
    assert _fires("0 0 29 2 *", _ns(2024, 3, 1), 1) == ["02-29 00:00:00 UTC"]  # 2028


def test_time_zones_and_dst() -> None:
    paris = "Europe/Paris"
    assert _fires("0 3 * * *", _ns(2024, 1, 1, 12), 1, paris) == ["01-02 03:00:00 CET"]
    # 02:30 does not exist on 2024-03-31 in Paris: it fires when the gap ends.
    assert _fires("30 2 * * *", _ns(2024, 3, 30, 12), 2, paris) == [
        "03-31 03:00:00 CEST", "04-01 02:30:00 CEST"]
    # 02:30 happens twice on 2024-10-27: it fires once, at the first.
    fired = _fires("30 2 * * *", _ns(2024, 10, 26, 12), 2, paris)
    assert fired == ["10-27 02:30:00 CEST", "10-28 02:30:00 CET"]
    # Every minute through the repeated hour: no minute fires twice.
    cron, tz = parse("0 * * * * *"), zone(paris)
    t, seen = _ns(2024, 10, 27, 0, 30), []
    for _ in range(150):
        found = cron.next_after(t, tz)
        assert found is not None and found > t
        seen.append(datetime.fromtimestamp(found / S, tz).replace(tzinfo=None))
        t = found
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("expr", [
    "", "* * * *", "* * * * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * * 13 *",
    "* * * * 8", "*/0 * * * *", "5-1 * * * *", "? * * * *", "x * * * *", "@sometimes",
    "* * * JANUARY *"])
def test_bad_expressions_are_refused(expr: str) -> None:
    with pytest.raises(CronError):
        parse(expr)


def test_an_expression_that_never_fires() -> None:
    assert parse("0 0 30 2 *").next_after(_ns(2024, 1, 1), zone("")) is None
    with pytest.raises(CronError):
        zone("Nowhere/Special")


def test_job_ids_route_to_their_queue() -> None:
    for queue in ("mail", "{tenant:7}orders", "a}b", "x" * 200, "p{q", "{}odd"):
        made = job_id(queue, 3, 1234567)
        assert slot_for(made) == slot_for(queue), (queue, made)
        assert len(made) <= 64
    assert job_id("mail", 1, 36) == "{mail}1-10"
    assert all(slot_for(slot_tag(s)) == s for s in (0, 1, 8191, 16383))
