"""Pure logic of the client's routing: map -> target, redirects, retries, static mode.

No etcd and no node: maps are built by hand and handed to the follower, and the
retry loop runs against scripted attempts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
import pytest

from clients import Mesh
from clients.cache import _decisive
from clients.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    MeshError,
    NoNodesError,
    UnavailableError,
    from_rpc_error,
)
from clients.retry import (
    MAX_HOPS,
    Backoff,
    Hop,
    Verdict,
    WrongOwner,
    classify,
    next_hop,
    with_retries,
)
from clients.router import Router, Target
from common.clustermap import RoutingTable, group_ranges
from common.errors import MeshStatusError, Reason
from common.slots import slot_for
from mesh.admin.v1 import admin_pb2

FAST = Backoff(initial=0.001, maximum=0.002)
ADDRESSES = {"n1": "10.0.0.1:7000", "n2": "10.0.0.2:7000", "n3": "10.0.0.3:7000"}

# Two groups: slots 0-8191 (group 1) and 8192-16383 (group 2).
assert slot_for("hello") < 8192 <= slot_for("foo")


def cluster_map(
    epoch: int, primaries: Iterable[str], down: Iterable[str] = ()
) -> admin_pb2.ClusterMap:
    """A map cut into one group per entry of ``primaries`` ("" = no primary)."""
    primaries = list(primaries)
    cmap = admin_pb2.ClusterMap(epoch=epoch)
    for gid, ((start, end), primary) in enumerate(
            zip(group_ranges(len(primaries)), primaries, strict=True), start=1):
        cmap.groups.append(admin_pb2.Group(
            group_id=gid, epoch=epoch, primary_node_id=primary,
            slot_ranges=[admin_pb2.SlotRange(start=start, end=end)]))
    for node_id, address in ADDRESSES.items():
        state = admin_pb2.NODE_STATE_DOWN if node_id in down else admin_pb2.NODE_STATE_ACTIVE
        cmap.nodes.append(admin_pb2.Node(node_id=node_id, address=address, state=state))
    return cmap


def wrong_owner(epoch: int, owner: str = "", by: str = "10.0.0.9:7000") -> MeshError:
    """A WRONG_OWNER refusal as the client sees it, parsed from a real status."""
    status = MeshStatusError(
        grpc.StatusCode.FAILED_PRECONDITION, "not the owner", Reason.WRONG_OWNER,
        {"slot": "12182", "group_id": "2", "epoch": str(epoch),
         "owner_node_id": "n2" if owner else "", "owner_address": owner}).to_status()
    rpc_error = grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata),
        status.details)
    return from_rpc_error(rpc_error, by)


def unavailable(reason: str = "", by: str = "10.0.0.1:7000") -> UnavailableError:
    error = UnavailableError("down", code=grpc.StatusCode.UNAVAILABLE, reason=reason)
    error.address = by
    return error


# -- route selection ----------------------------------------------------------

def test_key_goes_to_the_primary_of_its_group() -> None:
    router = Router(RoutingTable(cluster_map(7, ["n1", "n2"])), [])
    assert router.for_key("hello") == Target(ADDRESSES["n1"], "n1", 1, 7)
    assert router.for_key("foo") == Target(ADDRESSES["n2"], "n2", 2, 7)
    assert router.for_key("foo").owner
    # Hash tags keep related keys with their group.
    assert router.for_key("{foo}:cart") == router.for_key("foo")


def test_group_without_primary_or_no_map_goes_to_any_node_round_robin() -> None:
    nodes = [("n1", ADDRESSES["n1"]), ("n3", ADDRESSES["n3"])]
    router = Router(RoutingTable(cluster_map(3, ["n1", ""])), nodes)
    picks = [router.for_key("foo") for _ in range(4)]
    assert [t.address for t in picks] == [ADDRESSES[n] for n in ("n1", "n3", "n1", "n3")]
    assert not any(t.owner for t in picks) and {t.epoch for t in picks} == {3}
    assert router.for_key("hello").owner  # the other group still has its primary

    no_map = Router(None, nodes)
    assert [no_map.for_key("hello").node_id for _ in range(3)] == ["n1", "n3", "n1"]
    with pytest.raises(NoNodesError):
        Router(None, []).for_key("hello")


async def test_mesh_routes_by_the_map_it_follows() -> None:
    mesh = Mesh(etcd="127.0.0.1:1", timeout=1.0)  # never started: maps are handed in
    try:
        assert mesh.follower is not None
        assert mesh.epoch == 0 and mesh.call_metadata() is None
        with pytest.raises(NoNodesError):
            mesh.route("cache", "foo")  # no map, no membership

        mesh.follower.offer(cluster_map(5, ["n1", "n2"]).SerializeToString())
        assert mesh.epoch == 5
        assert mesh.route("cache", "foo").address == ADDRESSES["n2"]
        assert mesh.call_metadata() == (("x-mesh-route", "client"),)

        # A newer map moves group 2; an older one is ignored.
        mesh.follower.offer(cluster_map(6, ["n1", "n3"]).SerializeToString())
        mesh.follower.offer(cluster_map(4, ["n2", "n2"]).SerializeToString())
        assert mesh.route("cache", "foo").address == ADDRESSES["n3"]

        # No primary, no membership: any node of the map that is not down.
        mesh.follower.offer(cluster_map(8, ["", ""], down=["n2"]).SerializeToString())
        picks = {mesh.route("cache", "foo").address for _ in range(6)}
        assert picks == {ADDRESSES["n1"], ADDRESSES["n3"]}
    finally:
        await mesh.close()


async def test_static_mode_round_robin_without_route_header() -> None:
    addresses = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    async with Mesh(addresses=addresses) as mesh:
        assert mesh.follower is None and mesh.table is None and mesh.epoch == 0
        assert mesh.call_metadata() is None  # the nodes forward
        picks = [mesh.route("cache", "foo").address for _ in range(6)]
        assert picks == addresses * 2
        assert [n.address for n in mesh.nodes("cache")] == addresses


async def test_channels_of_nodes_that_left_the_map_are_retired() -> None:
    mesh = Mesh(etcd="127.0.0.1:1", timeout=1.0)
    try:
        assert mesh.follower is not None
        mesh.follower.offer(cluster_map(1, ["n1", "n2"]).SerializeToString())
        first = mesh.channel(ADDRESSES["n2"])
        assert mesh.channel(ADDRESSES["n2"]) is first  # one channel per node, reused
        kept = mesh.channel(ADDRESSES["n1"])

        cmap = cluster_map(2, ["n1", "n1"])
        del cmap.nodes[1]  # n2 left the map
        mesh.follower.offer(cmap.SerializeToString())
        assert ADDRESSES["n2"] not in mesh._channels and len(mesh._closing) == 1
        assert mesh.channel(ADDRESSES["n1"]) is kept
    finally:
        await mesh.close()
    assert not mesh._closing


# -- classifying failures and redirects ---------------------------------------

def test_wrong_owner_is_parsed_from_the_status_details() -> None:
    error = wrong_owner(9, owner=ADDRESSES["n2"], by=ADDRESSES["n1"])
    assert isinstance(error, FailedPreconditionError) and error.address == ADDRESSES["n1"]
    assert classify(error) is Verdict.REDIRECT
    assert WrongOwner.of(error) == WrongOwner(9, ADDRESSES["n2"], "n2", 12182, 2)


@pytest.mark.parametrize(("error", "verdict"), [
    (unavailable("NO_MAP"), Verdict.NOT_EXECUTED),
    (unavailable("GROUP_UNAVAILABLE"), Verdict.NOT_EXECUTED),
    (unavailable("OWNERSHIP_EXPIRED"), Verdict.NOT_EXECUTED),
    (unavailable("TOO_MANY_HOPS"), Verdict.NOT_EXECUTED),
    (NoNodesError("none"), Verdict.NOT_EXECUTED),
    (unavailable("NOT_COMMITTED"), Verdict.UNKNOWN),
    (unavailable(""), Verdict.UNKNOWN),  # a connection error
    (InvalidArgumentError("bad"), Verdict.FINAL),
    (FailedPreconditionError("no", reason="LOCK_NOT_HELD"), Verdict.FINAL),
])
def test_classify(error: MeshError, verdict: Verdict) -> None:
    assert classify(error) is verdict


def test_next_hop_rules() -> None:
    owner, me = ADDRESSES["n2"], ADDRESSES["n1"]
    # The node knows the owner, and its map is not older than ours: go there.
    assert next_hop(WrongOwner(5, owner), me, 5, 5, True) == Hop(owner)
    assert next_hop(WrongOwner(6, owner), me, 5, 6, True) == Hop(owner)
    # Its map is older than ours: ignore its hint; nothing new -> back off.
    assert next_hop(WrongOwner(4, owner), me, 5, 5, True) is None
    # No hint (or a batch, which takes none), but our map moved: route again.
    assert next_hop(WrongOwner(6, ""), me, 5, 6, True) == Hop(None)
    assert next_hop(WrongOwner(6, owner), me, 5, 6, False) == Hop(None)
    # Nothing new: no hint, same map -> back off rather than ask the same node again.
    assert next_hop(WrongOwner(5, ""), me, 5, 5, True) is None
    assert next_hop(WrongOwner(5, me), me, 5, 5, True) is None


# -- the retry loop -------------------------------------------------------------

class FakeMesh:
    """A MapSource whose refreshes reveal the next epoch of a script."""

    def __init__(self, epoch: int = 5, newer: Iterable[int] = (), timeout: float = 1.0) -> None:
        self.epoch = epoch
        self.timeout = timeout
        self.refreshes = 0
        self._newer = list(newer)

    async def refresh(self, timeout: float | None = None) -> None:
        self.refreshes += 1
        if self._newer:
            self.epoch = self._newer.pop(0)


class Script:
    """An attempt that fails with the given errors in turn, then returns "ok"
    (or, with ``forever``, keeps failing with the last one)."""

    def __init__(self, *errors: MeshError, forever: bool = False) -> None:
        self.errors = list(errors)
        self.forever = forever
        self.sent_to: list[str | None] = []

    async def __call__(self, budget: float, address: str | None) -> str:
        assert budget > 0, "an attempt was made past the deadline"
        self.sent_to.append(address)
        if self.errors:
            raise self.errors[0] if self.forever and len(self.errors) == 1 else self.errors.pop(0)
        return "ok"


async def run(mesh: FakeMesh, script: Script, *, safe: bool = False, timeout: float = 0.5,
              **kwargs: Any) -> str:
    return await with_retries(mesh, script, timeout=timeout, safe=safe, backoff=FAST, **kwargs)


async def test_newer_epoch_refreshes_then_follows_the_owner() -> None:
    mesh = FakeMesh(epoch=5, newer=[6])
    script = Script(wrong_owner(6, owner=ADDRESSES["n2"]))
    assert await run(mesh, script) == "ok"
    assert mesh.refreshes == 1 and mesh.epoch == 6
    assert script.sent_to == [None, ADDRESSES["n2"]]  # routed, then redirected at once


async def test_same_epoch_follows_the_hint_without_refreshing() -> None:
    mesh = FakeMesh(epoch=5)
    script = Script(wrong_owner(5, owner=ADDRESSES["n2"]))
    assert await run(mesh, script) == "ok"
    assert mesh.refreshes == 0 and script.sent_to == [None, ADDRESSES["n2"]]


async def test_refusal_without_owner_reroutes_by_the_refreshed_map() -> None:
    mesh = FakeMesh(epoch=5, newer=[7])
    script = Script(wrong_owner(7))
    assert await run(mesh, script) == "ok"
    assert script.sent_to == [None, None] and mesh.refreshes == 1


async def test_stale_node_refusal_backs_off_then_routes_by_our_map() -> None:
    mesh = FakeMesh(epoch=5)
    script = Script(wrong_owner(3, owner=ADDRESSES["n3"]))  # its hint is older than our map
    assert await run(mesh, script) == "ok"
    assert script.sent_to == [None, None]  # not to n3
    assert mesh.refreshes == 1  # the backoff's refresh, not a redirect's


async def test_hop_limit_then_unavailable_until_the_deadline() -> None:
    mesh = FakeMesh(epoch=5)
    # Owners that keep pointing elsewhere: MAX_HOPS hops, then a backoff, and again.
    refusals = [wrong_owner(5, owner=f"10.0.1.{i}:7000") for i in range(2 * MAX_HOPS + 2)]
    script = Script(*refusals, forever=True)
    with pytest.raises(UnavailableError) as caught:
        await run(mesh, script, timeout=0.2)
    assert caught.value.reason == "WRONG_OWNER"
    hints = script.sent_to
    # Every (MAX_HOPS + 1)-th send starts a fresh attempt, routed by the map.
    assert hints[0] is None and all(h is not None for h in hints[1:MAX_HOPS + 1])
    assert hints[MAX_HOPS + 1] is None
    assert mesh.refreshes >= 1


async def test_hop_limit_applies_to_unsafe_calls_too() -> None:
    # A refusal was not executed: an unsafe call (incr) is retried after the hops.
    mesh = FakeMesh(epoch=5)
    script = Script(*[wrong_owner(5, owner=f"10.0.1.{i}:7000") for i in range(MAX_HOPS + 1)])
    assert await run(mesh, script, safe=False) == "ok"
    assert len(script.sent_to) == MAX_HOPS + 2


@pytest.mark.parametrize("reason", ["NO_MAP", "GROUP_UNAVAILABLE", "OWNERSHIP_EXPIRED",
                                    "TOO_MANY_HOPS"])
async def test_not_executed_is_retried_for_any_call(reason: str) -> None:
    mesh = FakeMesh()
    script = Script(unavailable(reason), unavailable(reason))
    assert await run(mesh, script, safe=False) == "ok"
    assert mesh.refreshes == 2 and script.sent_to == [None, None, None]


@pytest.mark.parametrize("reason", ["NOT_COMMITTED", ""])
async def test_unknown_outcome_is_retried_only_when_safe(reason: str) -> None:
    script = Script(unavailable(reason))
    with pytest.raises(UnavailableError):
        await run(FakeMesh(), script, safe=False)
    assert len(script.sent_to) == 1
    assert await run(FakeMesh(), Script(unavailable(reason)), safe=True) == "ok"


async def test_final_errors_are_not_retried() -> None:
    script = Script(InvalidArgumentError("bad key"))
    with pytest.raises(InvalidArgumentError):
        await run(FakeMesh(), script, safe=True)
    assert len(script.sent_to) == 1


async def test_never_retries_past_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    script = Script(unavailable("NO_MAP"), forever=True)
    start = loop.time()
    with pytest.raises(UnavailableError):
        await with_retries(FakeMesh(), script, timeout=0.1, safe=True,
                           backoff=Backoff(initial=0.02, maximum=0.05))
    assert loop.time() - start < 0.1 + 0.02  # no pause, no send after the deadline


async def test_batches_ignore_hints_and_reroute_only_on_a_newer_map() -> None:
    mesh = FakeMesh(epoch=5, newer=[6])
    script = Script(wrong_owner(6, owner=ADDRESSES["n2"]))
    assert await run(mesh, script, follow_hints=False) == "ok"
    assert script.sent_to == [None, None]


def test_a_failed_batch_raises_the_error_that_decides_the_retry() -> None:
    old, new = wrong_owner(5), wrong_owner(8)
    bad = InvalidArgumentError("bad")
    lost = unavailable("")
    assert _decisive([lost, old, new]) is new  # the newest map's refusal: it may trigger a read
    assert _decisive([lost, bad, new]) is bad
    assert _decisive([unavailable("NO_MAP"), lost]) is lost
    bug = RuntimeError("bug")
    assert _decisive([bad, bug]) is bug
