"""The shared bounds on request times and ids, page tokens, and the cap on what an
error may quote (common.bounds, common.pagetoken, common.errors)."""

from __future__ import annotations

import datetime

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from common import pagetoken
from common.bounds import (
    MAX_DURATION_NS,
    MAX_DURATION_SECONDS,
    MAX_TIMESTAMP_SECONDS,
    check_bytes,
    duration_ns,
    duration_seconds,
    timestamp_ns,
)
from common.errors import (
    MAX_DETAIL_CHARS,
    MAX_MESSAGE_CHARS,
    MeshStatusError,
    Reason,
    capped,
    invalid_argument,
)
from nodes.scheduler.model import Backoff

S = 1_000_000_000
INT64_MAX = (1 << 63) - 1


def _field(exc: pytest.ExceptionInfo[MeshStatusError]) -> str:
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    (field,) = exc.value.violations
    return field


# -- timestamps -----------------------------------------------------------------------


def test_timestamp_range_is_1970_to_2200() -> None:
    assert timestamp_ns("t", timestamp_pb2.Timestamp()) == 0
    last = timestamp_pb2.Timestamp(seconds=MAX_TIMESTAMP_SECONDS - 1, nanos=S - 1)
    assert timestamp_ns("t", last) == MAX_TIMESTAMP_SECONDS * S - 1
    end = datetime.datetime.fromtimestamp(MAX_TIMESTAMP_SECONDS, datetime.UTC)
    assert end == datetime.datetime(2200, 1, 1, tzinfo=datetime.UTC)
    # Room to spare in int64 nanoseconds, and now + the longest duration stays
    # inside the bounds for any now before 2099 (services add durations to now).
    assert MAX_TIMESTAMP_SECONDS * S < INT64_MAX
    year_2099 = datetime.datetime(2099, 1, 1, tzinfo=datetime.UTC).timestamp()
    assert year_2099 * S + MAX_DURATION_NS < MAX_TIMESTAMP_SECONDS * S


@pytest.mark.parametrize("ts", [
    timestamp_pb2.Timestamp(seconds=MAX_TIMESTAMP_SECONDS),
    timestamp_pb2.Timestamp(seconds=9_223_372_037),  # just past 2262-04-11
    timestamp_pb2.Timestamp(seconds=253_402_300_799),  # 9999-12-31
    timestamp_pb2.Timestamp(seconds=-1),
    timestamp_pb2.Timestamp(seconds=1, nanos=-1),
    timestamp_pb2.Timestamp(seconds=1, nanos=S),
])
def test_timestamps_out_of_range_name_the_field(ts: timestamp_pb2.Timestamp) -> None:
    with pytest.raises(MeshStatusError) as exc:
        timestamp_ns("run_at", ts)
    assert _field(exc) == "run_at"


# -- durations ----------------------------------------------------------------------


def test_durations_up_to_100_years() -> None:
    assert duration_ns("d", duration_pb2.Duration()) == 0
    assert duration_ns("d", duration_pb2.Duration(seconds=1, nanos=5)) == S + 5
    longest = duration_pb2.Duration(seconds=MAX_DURATION_SECONDS)
    assert duration_ns("d", longest) == MAX_DURATION_NS
    assert duration_seconds("d", longest) == MAX_DURATION_SECONDS
    assert duration_seconds("d", duration_pb2.Duration(nanos=500_000_000)) == 0.5
    # 100 years of 365.25 days; now + that is a valid Timestamp for a long while.
    assert MAX_DURATION_SECONDS == 3_155_760_000


@pytest.mark.parametrize("d", [
    duration_pb2.Duration(seconds=MAX_DURATION_SECONDS, nanos=1),
    duration_pb2.Duration(seconds=MAX_DURATION_SECONDS + 1),
    duration_pb2.Duration(seconds=2**62),
    duration_pb2.Duration(seconds=INT64_MAX, nanos=S - 1),
    duration_pb2.Duration(seconds=-1),
    duration_pb2.Duration(nanos=-1),
    duration_pb2.Duration(seconds=1, nanos=-1),  # mixed signs
    duration_pb2.Duration(nanos=S),
])
def test_durations_out_of_range_name_the_field(d: duration_pb2.Duration) -> None:
    for convert in (duration_ns, duration_seconds):
        with pytest.raises(MeshStatusError) as exc:
            convert("entries[3].ttl", d)
        assert _field(exc) == "entries[3].ttl"


def test_check_bytes_counts_utf8() -> None:
    check_bytes("id", "x" * 64, 64)
    check_bytes("id", "", 64)
    for bad in ("x" * 65, "é" * 33):
        with pytest.raises(MeshStatusError) as exc:
            check_bytes("lease_id", bad, 64)
        assert _field(exc) == "lease_id"
        assert bad not in exc.value.message
    with pytest.raises(MeshStatusError):
        check_bytes("id", "", 64, required=True)


# -- page tokens ----------------------------------------------------------------------


def test_page_tokens_round_trip() -> None:
    token = pagetoken.encode("list.a", 1_700_000_000_000_000_000, "{q}1-2")
    assert token.isascii() and "=" not in token
    assert pagetoken.decode(token, "list.a", (int, str)) == (1_700_000_000_000_000_000,
                                                              "{q}1-2")
    assert pagetoken.decode("", "list.a", (int, str)) is None
    unicode = pagetoken.encode("list.b", "é\x00\u2026")
    assert pagetoken.decode(unicode, "list.b", (str,)) == ("é\x00\u2026",)


@pytest.mark.parametrize("token", [
    "%%%", "0:x", "x", "é", "a" * (pagetoken.MAX_TOKEN_CHARS + 1),
    pagetoken.encode("list.other", 1, "x"),  # another listing's
    pagetoken.encode("list.a", "1", "x"),  # wrong types
    pagetoken.encode("list.a", 1),  # wrong shape
    pagetoken.encode("list.a", 1, "x", 2),
])
def test_page_tokens_nobody_gave_are_refused(token: str) -> None:
    with pytest.raises(MeshStatusError) as exc:
        pagetoken.decode(token, "list.a", (int, str))
    assert _field(exc) == "page_token"
    assert exc.value.message == "page_token: is not a page token this call gave"


def test_a_tampered_token_is_refused() -> None:
    token = pagetoken.encode("list.a", 5, "job")
    for i in range(len(token)):
        flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        try:
            decoded = pagetoken.decode(flipped, "list.a", (int, str))
        except MeshStatusError:
            continue
        # Only a change in the padding bits of the last character can decode.
        assert decoded == (5, "job") and i == len(token) - 1


# -- the cap on errors -----------------------------------------------------------------


def test_capped() -> None:
    assert capped("short") == "short"
    assert capped("x" * MAX_DETAIL_CHARS) == "x" * MAX_DETAIL_CHARS
    cut = capped("x" * 10_000)
    assert len(cut) == MAX_DETAIL_CHARS and cut.endswith("\u2026")
    assert capped("abcdef", 4) == "abc\u2026"


def test_mesh_status_error_never_carries_unbounded_text() -> None:
    long = "L" * (1 << 20)
    error = MeshStatusError(
        grpc.StatusCode.FAILED_PRECONDITION, f"lease {long!r} is unknown",
        Reason.LOCK_NOT_HELD, {"lease_id": long, "name": "n"}, violations={long: long})
    assert len(error.message) == MAX_MESSAGE_CHARS and error.message.endswith("\u2026")
    assert len(str(error)) == MAX_MESSAGE_CHARS
    assert error.metadata["name"] == "n"
    assert len(error.metadata["lease_id"]) == MAX_DETAIL_CHARS
    error.metadata["later"] = long  # even what is added afterwards is capped on the wire
    status = error.to_status()
    assert len(status.details) == MAX_MESSAGE_CHARS
    wire = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert len(wire) < 4 * (MAX_MESSAGE_CHARS + 6 * MAX_DETAIL_CHARS)
    proto = status_pb2.Status.FromString(wire)
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    assert proto.details[0].Unpack(info) and proto.details[1].Unpack(bad)
    assert all(len(v) <= MAX_DETAIL_CHARS for v in info.metadata.values())
    (violation,) = bad.field_violations
    assert len(violation.field) == len(violation.description) == MAX_DETAIL_CHARS


def test_invalid_argument_is_unchanged_when_short() -> None:
    error = invalid_argument("ttl", "must be at most 100 years")
    assert error.message == "ttl: must be at most 100 years"
    assert error.metadata == {"field": "ttl"}
    assert error.violations == {"ttl": "must be at most 100 years"}


# -- a related overflow ---------------------------------------------------------------


def test_backoff_growth_past_float_range_stays_at_the_max() -> None:
    backoff = Backoff(initial_ns=S, max_ns=3600 * S, multiplier=1000.0, jitter=0.0)
    assert backoff.delay_ns(999, 0.0) == 3600 * S  # 1000.0 ** 998 overflows a float
    assert backoff.delay_ns(1, 0.0) == S
