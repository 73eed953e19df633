"""`common.grpc_engine`: the gRPC engine setting a child process starts with."""

from __future__ import annotations

from common import grpc_engine


def test_adds_the_setting_and_keeps_the_rest() -> None:
    env = grpc_engine.environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", grpc_engine.VARIABLE: grpc_engine.EXPERIMENTS}


def test_an_operators_own_setting_wins() -> None:
    env = grpc_engine.environment({grpc_engine.VARIABLE: "event_engine_client"})
    assert env[grpc_engine.VARIABLE] == "event_engine_client"

