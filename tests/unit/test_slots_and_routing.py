"""Pure logic: the slot function and rendezvous routing."""

from __future__ import annotations

from collections import Counter

from clients.routing import SlotRouter
from common.membership import NodeInfo
from common.slots import SLOT_COUNT, crc16_xmodem, hash_part, slot_for


def test_crc16_xmodem_test_vector() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert crc16_xmodem(b"") == 0


def test_slots_match_redis_cluster() -> None:
    # Values from Redis Cluster's CLUSTER KEYSLOT.
    assert slot_for("foo") == 12182
    assert slot_for("bar") == 5061
    assert slot_for("hello") == 866


def test_hash_tags() -> None:
    assert hash_part(b"{user1000}.following") == b"user1000"
    assert slot_for("{user1000}.following") == slot_for("{user1000}.followers")
    assert hash_part(b"foo{}{bar}") == b"foo{}{bar}"  # empty first tag: whole key
    assert hash_part(b"foo{{bar}}zap") == b"{bar"
    assert hash_part(b"foo{bar}{zap}") == b"bar"
    assert slot_for(b"\xff\x00binary") == slot_for(b"\xff\x00binary")
    assert all(0 <= slot_for(f"k{i}") < SLOT_COUNT for i in range(1000))


def _nodes(*ids: str) -> list[NodeInfo]:
    return [NodeInfo(node_id=i, address=f"{i}:1", services=("cache",), version="") for i in ids]


def _owners(router: SlotRouter) -> list[str]:
    owners = []
    for slot in range(SLOT_COUNT):
        node = router.node_for_slot(slot)
        assert node is not None
        owners.append(node.node_id)
    return owners


def test_rendezvous_is_balanced_and_moves_about_one_nth() -> None:
    router = SlotRouter()
    router.update(_nodes("a", "b", "c"))
    before = _owners(router)
    counts = Counter(before)
    assert all(abs(c - SLOT_COUNT / 3) < SLOT_COUNT * 0.05 for c in counts.values()), counts

    router.update(_nodes("a", "b", "c", "d"))
    after = _owners(router)
    moved = sum(x != y for x, y in zip(before, after, strict=True))
    # Only slots won by the newcomer move: about 1/4 of them.
    assert all(y == "d" for x, y in zip(before, after, strict=True) if x != y)
    assert 0.20 < moved / SLOT_COUNT < 0.30

    router.update(_nodes("a", "c", "d"))
    removed = _owners(router)
    assert all(x == "b" for x, y in zip(after, removed, strict=True) if x != y)


def test_empty_router_has_no_owner() -> None:
    router = SlotRouter()
    assert not router
    assert router.node_for_key("k") is None
