"""The coordinator's GetPosition round: a node that does not answer costs the round
one call's timeout, and never holds up the calls to the other nodes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from common.peer import COORDINATOR, PeerSigner
from coordinator.positions import PositionProbe
from mesh.replication.v1 import replication_pb2 as rpb


class Stub:
    """GetPosition of one node: answers at once, or (``silent``) waits out the
    deadline like a paused process."""

    def __init__(self, silent: bool, calls: list[str], address: str) -> None:
        self._silent = silent
        self._refusing = address.startswith("refusing")
        self._calls = calls
        self._address = address

    async def GetPosition(self, request: rpb.GetPositionRequest, timeout: float,
                          **_: Any) -> rpb.GetPositionResponse:
        self._calls.append(self._address)
        if self._refusing:  # answers, with an error: each pair gets its own answer
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata())
        if self._silent:
            await asyncio.sleep(timeout)
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                       grpc.aio.Metadata())
        return rpb.GetPositionResponse(group_id=request.group_id, applied_seq=7)


class Probe(PositionProbe):
    def __init__(self, silent: set[str], **kwargs: Any) -> None:
        super().__init__(PeerSigner(None, COORDINATOR, "c"), **kwargs)
        self.silent = silent
        self.calls: list[str] = []

    def _stub(self, address: str) -> Any:
        return Stub(address in self.silent, self.calls, address)


@pytest.mark.timeout(10)
async def test_a_silent_node_is_asked_once_per_wave_and_the_others_all_answer() -> None:
    probe = Probe({"paused:1"}, timeout=0.2, concurrency=8)
    addresses = {"paused": "paused:1", "a": "a:1", "b": "b:1", "refusing": "refusing:1"}
    # The paused node's pairs come first, as many as would fill ten waves.
    pairs = [("paused", g) for g in range(80)] + [(n, g) for n in ("a", "b") for g in range(40)]
    pairs += [("refusing", g) for g in range(5)]
    positions, absent = await probe.gather(pairs, addresses)
    assert absent == frozenset()
    assert set(positions) == {(n, g) for n in ("a", "b") for g in range(40)}
    assert all(p.applied_seq == 7 for p in positions.values())
    # Only the calls already under way when the first timed out reached it.
    assert 1 <= probe.calls.count("paused:1") <= 8
    assert probe.calls.count("refusing:1") == 5
