"""`common.event_loop`: which loop a server process runs on."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging

import pytest
import uvloop

from common import event_loop


def test_auto_takes_uvloop_where_it_is_installed() -> None:
    assert event_loop.chosen("auto") == "uvloop"
    assert event_loop.chosen("uvloop") == "uvloop"
    assert event_loop.chosen("asyncio") == "asyncio"


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert event_loop.chosen("auto") == "asyncio"
    with pytest.raises(ValueError, match="uvloop is not installed"):
        event_loop.chosen("uvloop")


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="must be one of auto, uvloop, asyncio"):
        event_loop.chosen("trio")


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_runs_on_the_loop_chosen(name: str) -> None:
    async def which() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def kind() -> str:
        return event_loop.running()

    loop = event_loop.run(which(), name)
    assert isinstance(loop, uvloop.Loop) == (name == "uvloop")
    assert event_loop.run(kind(), name) == name


def test_the_flag_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_EVENT_LOOP", "AsyncIO")
    p = argparse.ArgumentParser()
    event_loop.add_event_loop_flag(p)
    assert p.parse_args([]).event_loop == "asyncio"
    assert p.parse_args(["--event-loop", "uvloop"]).event_loop == "uvloop"


def _failed_future(filename: str) -> None:
    """A future failed with a ConnectionResetError raised in code from ``filename``,
    dropped unretrieved (the loop's handler hears of it when it is collected)."""
    future = asyncio.get_running_loop().create_future()
    try:
        exec(compile("raise ConnectionResetError()", filename, "exec"))
    except ConnectionResetError as error:
        future.set_exception(error)
    del future


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_a_tls_handshake_reset_by_its_peer_is_one_info_line(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    """The loop's TLS layer leaves such a future unretrieved; the default handler
    logs it as an ERROR with a traceback. The same error from anywhere else
    still goes to the default handler."""
    async def drop_two() -> None:
        _failed_future("uvloop/sslproto.pyx")
        _failed_future("nodes/somewhere.py")
        gc.collect()
        await asyncio.sleep(0)

    caplog.set_level(logging.INFO)
    event_loop.run(drop_two(), name)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "a TLS connection was closed by its peer during the handshake "
                    "(ConnectionResetError)") in said
    errors = [m for level, m in said if level == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("Future exception was never retrieved")
