"""Cron expressions: parsing (5 or 6 fields, seconds first) and the next firing time.

Written here rather than taken from a library because the usual Python one
(croniter) reads a sixth field as trailing seconds, while robfig/cron and
Quartz, and this service's contract, read it as leading seconds.

Times are computed on the local wall clock of the schedule's time zone and
converted to instants: a wall time skipped by a DST change fires at the first
instant after the gap, and a repeated wall time fires once (at its first
occurrence).
"""

from __future__ import annotations

import bisect
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

__all__ = ["CronError", "CronExpr", "parse", "zone"]

_NS = 1_000_000_000
_HORIZON_DAYS = 5 * 366
"""Search this far ahead for a firing; an expression with none is refused."""

_MACROS = {
    "@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
_MONTHS = {n: i for i, n in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}
_DAYS = {n: i for i, n in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
# (name, low, high, names)
_FIELDS = (("second", 0, 59, None), ("minute", 0, 59, None), ("hour", 0, 23, None),
           ("day of month", 1, 31, None), ("month", 1, 12, _MONTHS),
           ("day of week", 0, 7, _DAYS))


class CronError(ValueError):
    """A cron expression or time zone that cannot be used."""


@dataclass(frozen=True, slots=True)
class CronExpr:
    """A parsed expression: the allowed values of each field, sorted."""

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    """0 = Sunday."""
    any_day: bool
    """Day of month is * or ?."""
    any_weekday: bool

    def day_matches(self, day: datetime) -> bool:
        # Classic cron: if both day fields are restricted, either may match.
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, after_ns: int, tz: tzinfo) -> int | None:
        """The first firing strictly after ``after_ns`` (Unix ns), or None within
        the search horizon."""
        after_s = after_ns // _NS
        local = datetime.fromtimestamp(after_s, tz).replace(tzinfo=None)
        t = local + timedelta(seconds=1)
        limit = local + timedelta(days=_HORIZON_DAYS)
        while t <= limit:
            found = self._next_local(t, limit)
            if found is None:
                return None
            instant = _instant(found, tz)
            if instant > after_s:
                return instant * _NS
            # A wall time repeated by a DST change, whose first occurrence is
            # already past: it fired then.
            t = found + timedelta(seconds=1)
        return None

    def _next_local(self, t: datetime, limit: datetime) -> datetime | None:
        """The first wall time at or after ``t`` that matches."""
        while t <= limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0, second=0) + timedelta(days=32)
                     ).replace(day=1)
                continue
            if not self.day_matches(t):
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
                continue
            hour = _at_or_after(self.hours, t.hour)
            if hour is None:
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
                continue
            if hour != t.hour:
                t = t.replace(hour=hour, minute=0, second=0)
            minute = _at_or_after(self.minutes, t.minute)
            if minute is None:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if minute != t.minute:
                t = t.replace(minute=minute, second=0)
            second = _at_or_after(self.seconds, t.second)
            if second is None:
                t = t.replace(second=0) + timedelta(minutes=1)
                continue
            return t.replace(second=second)
        return None


def _at_or_after(values: tuple[int, ...], value: int) -> int | None:
    i = bisect.bisect_left(values, value)
    return values[i] if i < len(values) else None


def _instant(local: datetime, tz: tzinfo) -> int:
    """Unix seconds of a wall time: its first occurrence if repeated, the end of
    the gap if skipped."""
    first = int(local.replace(tzinfo=tz, fold=0).timestamp())
    if datetime.fromtimestamp(first, tz).replace(tzinfo=None) == local:
        return first
    # In a gap: fold=0 reads it with the offset before the change, fold=1 with
    # the one after; the change itself lies between the two readings.
    other = int(local.replace(tzinfo=tz, fold=1).timestamp())
    low, high = min(first, other), max(first, other)
    while low < high:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, tz).replace(tzinfo=None) > local:
            high = middle
        else:
            low = middle + 1
    return low


def zone(name: str) -> tzinfo:
    """The time zone called ``name`` ("" and "UTC": UTC)."""
    if not name or name == "UTC":
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(f"unknown time zone {name!r}") from exc


def parse(text: str) -> CronExpr:
    """Parse 5 fields (minute first) or 6 (second first), or a macro."""
    expr = text.strip()
    expr = _MACROS.get(expr.lower(), expr)
    if expr.startswith("@"):
        raise CronError(f"unknown macro {expr.split()[0]!r}")
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise CronError(f"need 5 or 6 fields, got {len(fields)}")
    values = [_field(f, *spec) for f, spec in zip(fields, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in values[5])
    return CronExpr(
        seconds=tuple(sorted(values[0])), minutes=tuple(sorted(values[1])),
        hours=tuple(sorted(values[2])), days=frozenset(values[3]),
        months=frozenset(values[4]), weekdays=weekdays,
        any_day=fields[3] in ("*", "?"), any_weekday=fields[5] in ("*", "?"))


def _field(text: str, name: str, low: int, high: int, names: dict[str, int] | None
           ) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        out |= _part(part, name, low, high, names)
    return out


def _part(part: str, name: str, low: int, high: int, names: dict[str, int] | None
          ) -> set[int]:
    base, slash, step_text = part.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit() or int(step_text) == 0:
            raise CronError(f"{name}: bad step in {part!r}")
        step = int(step_text)
    if base in ("*", "?"):
        if base == "?" and name not in ("day of month", "day of week"):
            raise CronError(f"{name}: '?' is only for the day fields")
        start, end = low, high
    elif "-" in base:
        a, _, b = base.partition("-")
        start, end = _value(a, name, low, high, names), _value(b, name, low, high, names)
        if start > end:
            raise CronError(f"{name}: range {part!r} goes backwards")
    else:
        start = _value(base, name, low, high, names)
        end = high if slash else start
    if name == "day of week" and base in ("*", "?"):
        end = 6  # 7 is only another name for Sunday
    return set(range(start, end + 1, step))


def _value(text: str, name: str, low: int, high: int, names: dict[str, int] | None) -> int:
    if names is not None and text.upper() in names:
        return names[text.upper()]
    if not text.isdigit():
        raise CronError(f"{name}: {text!r} is not a number"
                        + (" or a name" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"{name}: {value} is outside {low}-{high}")
    return value
