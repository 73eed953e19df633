"""A node's MGet and MSet for keys led by several other nodes: the shares go to
their owners at once, and a failed share fails the call only once every share
has ended."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.errors import MeshStatusError, Reason
from common.slots import slot_for
from mesh.cache.v1 import cache_pb2 as pb
from nodes.cache.service import CacheService
from nodes.config import CacheLimits
from nodes.replication.manager import Redirect, unavailable

pytestmark = pytest.mark.timeout(20)

OWNERS = ("b", "c", "d")


def _owner(slot: int) -> str:
    return OWNERS[slot % len(OWNERS)]


class Owners:
    """The forwarder of a node that leads no slot: each slot is led by one of
    `OWNERS`. A share's forward waits until every owner has been asked (which
    never happens if the node asks them one after another), then answers, or
    fails for the owner ``failing`` (the others then end a little later)."""

    def __init__(self, failing: str = "") -> None:
        self.failing = failing
        self.asked: list[str] = []
        self.ended: list[str] = []
        self._all_asked = asyncio.Event()
        self._failed = asyncio.Event()

    def resolve(self, slot: int, context: object) -> Redirect:
        owner = _owner(slot)
        return Redirect(slot=slot, group_id=OWNERS.index(owner) + 1, epoch=1,
                        owner_node_id=owner, owner_address=f"{owner}:7000",
                        owner_peer_address=f"{owner}:7001")

    async def unary(self, target: Redirect, path: str, request: Any, response_type: type,
                    context: Any) -> Any:
        owner = target.owner_node_id
        self.asked.append(owner)
        if len(self.asked) == len(OWNERS):
            self._all_asked.set()
        try:
            await asyncio.wait_for(self._all_asked.wait(), 2)
            if owner == self.failing:
                self._failed.set()
                raise unavailable(Reason.GROUP_UNAVAILABLE, f"{owner} is gone")
            if self.failing:  # the others end a few loop turns after it failed
                await self._failed.wait()
                for _ in range(5):
                    await asyncio.sleep(0)
            if path.endswith("/MGet"):
                return pb.MGetResponse(results=[pb.GetResponse(found=True, value=k.encode())
                                                for k in request.keys])
            return pb.MSetResponse(versions=[7] * len(request.entries))
        finally:
            self.ended.append(owner)


def _keys() -> list[str]:
    """Keys led by each owner, two apiece."""
    keys: dict[str, list[str]] = {owner: [] for owner in OWNERS}
    i = 0
    while any(len(k) < 2 for k in keys.values()):
        key = f"key-{i}"
        if len(keys[_owner(slot_for(key))]) < 2:
            keys[_owner(slot_for(key))].append(key)
        i += 1
    return [key for pair in zip(*keys.values(), strict=True) for key in pair]


def _service(owners: Owners) -> CacheService:
    service = CacheService(CacheLimits())
    service.start_routing(owners)  # type: ignore[arg-type]
    return service


async def test_an_mget_asks_every_owner_at_once() -> None:
    owners = Owners()
    keys = _keys()
    context: Any = None  # only handed to the forwarder
    answer = await _service(owners).MGet(pb.MGetRequest(keys=keys), context)
    assert [r.value for r in answer.results] == [k.encode() for k in keys]
    assert sorted(owners.asked) == sorted(OWNERS)


async def test_an_mset_writes_every_share_at_once() -> None:
    owners = Owners()
    entries = [pb.MSetEntry(key=k, value=b"v") for k in _keys()]
    context: Any = None
    answer = await _service(owners).MSet(pb.MSetRequest(entries=entries), context)
    assert list(answer.versions) == [7] * len(entries)
    assert sorted(owners.asked) == sorted(OWNERS)


async def test_a_failed_share_fails_the_call_once_every_share_has_ended() -> None:
    owners = Owners(failing="c")
    entries = [pb.MSetEntry(key=k, value=b"v") for k in _keys()]
    context: Any = None
    with pytest.raises(MeshStatusError) as info:
        await _service(owners).MSet(pb.MSetRequest(entries=entries), context)
    assert info.value.reason == "GROUP_UNAVAILABLE"
    assert sorted(owners.ended) == sorted(OWNERS)  # nothing still in flight
