"""`common.event_loop`: which loop a server process runs on."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util

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
