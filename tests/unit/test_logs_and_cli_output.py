"""The JSON log formatter and meshctl's output helpers, in-process and without a mesh."""

from __future__ import annotations

import enum
import io
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import click
import grpc
import pytest

from clients.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    KeyExistsError,
    NoNodesError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from common import logs
from common.etcd import EtcdAccessError
from common.process import say
from mesh.admin.v1 import admin_pb2
from meshctl import output
from meshctl.cli import main, version
from meshctl.context import Settings
from meshctl.status import NodeStatus, format_status, node_dict


def _record(message: str, *args: object, exc: bool = False, **extra: object) -> str:
    logger = logging.getLogger("mesh.test")
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            import sys

            exc_info = sys.exc_info()
    record = logger.makeRecord("mesh.test", logging.WARNING, __file__, 1, message, args,
                               exc_info, extra=extra or None)
    return logs.JsonFormatter().format(record)


def test_outside_input_is_quoted_on_one_capped_line() -> None:
    assert logs.loggable("/v1/cache/k") == "/v1/cache/k"
    assert logs.loggable("/v1/caf\u00e9 x") == "/v1/caf\u00e9 x"  # printable stays as it is
    forged = logs.loggable("/v1/k\n2026-12-05 INFO gateway.access: GET /\x1b[2J")
    assert forged == "/v1/k\\n2026-12-05 INFO gateway.access: GET /\\x1b[2J"
    assert "\n" not in forged and "\x1b" not in forged
    long = logs.loggable("q" * 40_000)
    assert len(long) == logs.MAX_LOGGED_CHARS and long.endswith("\u2026")
    # Escaping makes a line longer: the bound holds after it.
    assert len(logs.loggable("\x00" * 1_000)) == logs.MAX_LOGGED_CHARS
    assert logs.loggable("abcdef", 4) == "abc\u2026"


def test_json_formatter_writes_one_object_per_line() -> None:
    line = _record("moved %d groups\nto %s", 3, "node-2")
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "mesh.test"
    assert entry["message"] == "moved 3 groups\nto node-2"
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert "exception" not in entry


def test_json_formatter_keeps_exceptions_and_extra_fields() -> None:
    entry = json.loads(_record("failed", exc=True, node_id="node-1", attempt=2,
                               thing=object()))
    assert "RuntimeError: boom" in entry["exception"]
    assert entry["exception"].startswith("Traceback")
    assert entry["node_id"] == "node-1" and entry["attempt"] == 2
    assert entry["thing"].startswith("<object")  # not JSON: its repr


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger as an earlier test (in this worker) left it, with no
    handler of `logs.configure`'s, and as it was again afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    installed = list(logs._installed)
    for handler in installed:
        root.removeHandler(handler)
    logs._installed.clear()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logs._installed[:] = installed
        logging.captureWarnings(False)


def test_configure_replaces_handlers_and_filters_by_level(root_logging: None) -> None:
    stream = io.StringIO()
    before = len(logging.getLogger().handlers)
    logs.configure("info", "json", stream)
    logs.configure("warning", "json", stream)  # twice: still one handler of ours
    assert len(logging.getLogger().handlers) == before + 1
    logging.getLogger("a").info("hidden")
    logging.getLogger("a").error("shown")
    lines = stream.getvalue().splitlines()
    assert [json.loads(x)["message"] for x in lines] == ["shown"]
    text = io.StringIO()
    logs.configure("DEBUG", "text", text)
    logging.getLogger("b").debug("plain")
    assert text.getvalue().rstrip().endswith("DEBUG b: plain")


def test_a_stream_whose_client_left_is_one_info_line_not_a_grpc_traceback(
        root_logging: None) -> None:
    """gRPC logs a server stream's write that failed because the client had gone
    (ExecuteBatchError) at ERROR with a traceback; it is how subscriptions end."""
    from grpc._cython.cygrpc import ExecuteBatchError

    stream = io.StringIO()
    logs.configure("info", "text", stream)
    core = logging.getLogger("grpc._cython.cygrpc")
    for error in (ExecuteBatchError("Failed execute_batch"), RuntimeError("a real bug")):
        try:
            raise error
        except Exception:
            core.exception("%s raised in core by servicer method [%s]",
                           type(error).__name__, "/mesh.notify.v1.NotifyService/Subscribe")
    gone, *bug = stream.getvalue().splitlines()
    assert gone.endswith("INFO grpc._cython.cygrpc: /mesh.notify.v1.NotifyService/Subscribe: "
                         "the stream's client left before a message could be sent to it")
    assert "ERROR" in bug[0] and "Traceback (most recent call last):" in bug
    assert bug[-1] == "RuntimeError: a real bug"
    logs.configure("warning", "text", stream := io.StringIO())
    try:
        raise ExecuteBatchError("Failed execute_batch")
    except Exception:
        core.exception("ExecuteBatchError raised in core by servicer method [/a.B/C]")
    assert stream.getvalue() == ""  # INFO, below the threshold


class _Stuck(io.StringIO):
    """A stream whose writes wait until ``released`` (a log reader that stopped)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.released = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.released.wait(10)
        return super().write(text)


def test_a_server_logs_from_a_writer_thread_and_drops_what_a_stuck_reader_cannot_take(
        root_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "QUEUED", 5)
    stream = _Stuck()
    logs.configure("info", "json", stream, background=True)
    log = logging.getLogger("mesh.test")
    log.info("first %s", "record")
    assert stream.writing.wait(10)  # the writer holds it, waiting on the stream
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    for i in range(20):
        log.info("record %d", i)  # returns at once: 4 more wait, 16 are dropped
    stream.released.set()
    logs._flush()  # as at exit: what is queued is written
    entries = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [e["message"] for e in entries] == [
        "first record", "failed", *(f"record {i}" for i in range(4)),
        "16 log records dropped: the log's reader fell behind"]
    assert "RuntimeError: boom" in entries[1]["exception"]  # apart, as written at once


def test_a_ready_line_is_one_write() -> None:
    # print() writes a line and its newline apart, and the log's writer thread
    # could write between them into a file stdout and stderr share: `make run`
    # failed to parse a gateway's READY line so.
    class Writes(io.StringIO):
        calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    out = Writes()
    say('READY {"address": "127.0.0.1:1"}', out)
    assert out.calls == ['READY {"address": "127.0.0.1:1"}\n']


def test_configure_refuses_unknown_levels_and_formats(root_logging: None) -> None:
    with pytest.raises(ValueError, match="log level"):
        logs.configure("loud")
    with pytest.raises(ValueError, match="log format"):
        logs.configure("info", "xml")


class Color(enum.Enum):
    RED = 1


@dataclass
class Row:
    name: str
    color: Color
    data: bytes
    raw: bytes
    when: float | None
    tags: tuple[str, ...]


def test_to_jsonable_turns_dataclasses_enums_and_bytes_into_json() -> None:
    row = Row("a", Color.RED, b"hello", b"\xff\x00", None, ("x", "y"))
    assert output.to_jsonable([row]) == [{
        "name": "a", "color": "RED", "data": "hello", "raw": {"base64": "/wA="},
        "when": None, "tags": ["x", "y"]}]


@pytest.mark.parametrize(("error", "code"), [
    (UnavailableError("x"), output.UNREACHABLE),
    (NoNodesError("x"), output.UNREACHABLE),
    (DeadlineExceededError("x"), output.UNREACHABLE),
    (EtcdAccessError("wrong password"), output.UNREACHABLE),
    (InvalidArgumentError("x"), output.USAGE),
    (KeyExistsError("x"), output.FAILED),
    (NotFoundError("x"), output.FAILED),
    (UnauthenticatedError("x", code=grpc.StatusCode.UNAUTHENTICATED), output.FAILED),
])
def test_exit_codes_by_error(error: BaseException, code: int) -> None:
    assert output.exit_code(error) == code
    line = output.error_line(error)
    assert line.startswith("error: ") and "\n" not in line


def test_error_lines_hint_at_the_fix() -> None:
    assert "MESH_TOKEN" in output.error_line(UnauthenticatedError("no token"))
    assert "check --etcd" in output.error_line(UnavailableError("refused\nby peer"))
    assert output.error_line(KeyExistsError("exists")) == "error: KeyExistsError: exists"


def _map() -> admin_pb2.ClusterMap:
    cmap = admin_pb2.ClusterMap(epoch=7)
    group = cmap.groups.add(group_id=1, epoch=5, primary_node_id="n1")
    group.slot_ranges.add(start=0, end=99)
    group.replicas.add(node_id="n2", in_sync=True, lag_commands=3).lag.FromMilliseconds(250)
    group.target.primary_node_id = "n2"
    group.target.replica_node_ids.append("n1")
    lost = cmap.groups.add(group_id=2, epoch=6)
    lost.slot_ranges.add(start=100, end=16383)
    lost.lost_copies.append("n3")
    cmap.nodes.add(node_id="n1", address="h:1", state=admin_pb2.NODE_STATE_ACTIVE,
                   primary_slots=100, primary_group_ids=[1])
    cmap.nodes.add(node_id="n2", address="h:2", state=admin_pb2.NODE_STATE_DRAINING,
                   replica_slots=100, replica_group_ids=[1])
    return cmap


def test_topology_dict_has_the_documented_keys() -> None:
    data = output.topology_dict(_map())
    assert json.loads(json.dumps(data)) == data
    assert data["epoch"] == 7 and set(data) == {"epoch", "update_time", "groups", "nodes"}
    first, lost = data["groups"]
    assert first == {"group_id": 1, "epoch": 5, "slots": [[0, 99]], "primary": "n1",
                     "replicas": [{"node_id": "n2", "in_sync": True, "lag_commands": 3,
                                   "lag_seconds": 0.25}],
                     "target": {"primary": "n2", "replicas": ["n1"]}, "lost_copies": []}
    assert lost["primary"] is None and lost["target"] is None and lost["lost_copies"] == ["n3"]
    assert [n["state"] for n in data["nodes"]] == ["ACTIVE", "DRAINING"]
    assert data["nodes"][0]["primary_groups"] == [1] and data["nodes"][1]["replica_groups"] == [1]


def test_topology_dot_draws_nodes_and_groups() -> None:
    dot = output.topology_dot(_map())
    assert dot.startswith("digraph mesh {") and dot.endswith("}")
    assert '"n1" [label="n1\\nACTIVE"];' in dot
    assert '"n1" -> "group-1";' in dot and '"n2" -> "group-1" [style=dashed];' in dot
    assert '"group-2" [shape=ellipse, label="group 2\\n100-16383"];' in dot


def test_settings_refuse_a_malformed_etcd_endpoint() -> None:
    for bad in ("bogus", "host:port", ""):
        with pytest.raises(click.UsageError):
            Settings(etcd=bad).access()
    assert Settings(etcd="a:1, b:2").access().endpoints == ("a:1", "b:2")


def test_main_returns_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"meshctl {version()}\n"
    assert main(["--no-such-flag"]) == output.USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: No such option") and len(err.splitlines()) == 1
    assert main(["--etcd", "bogus", "topology"]) == output.USAGE
    assert "host:port" in capsys.readouterr().err
    assert main(["topology", "--help"]) == 0
    assert "--watch" in capsys.readouterr().out


def test_status_names_the_replicas_a_node_reports_silent() -> None:
    rows = [NodeStatus("n1", "10.0.0.1:50051", ("cache",), "SERVING", 3, silent=("n2",)),
            NodeStatus("n2", "10.0.0.2:50051", ("cache",), "SERVING", 4)]
    lines = format_status(rows)
    assert len(lines) == 4
    assert lines[3].startswith("n1: not answered by n2;")
    assert node_dict(rows[0])["silent_replicas"] == ["n2"]
    assert node_dict(rows[1])["silent_replicas"] == []
