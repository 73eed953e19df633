"""Pure logic: the slot function. (Routing by the cluster map: test_client_routing.py.)"""

from __future__ import annotations

import pytest

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


def test_a_tenants_names_route_like_the_names_themselves() -> None:
    for name in ("user:1", "{user:1}:cart", "order-42", "a{}b"):
        assert slot_for(f"acme\x1f{name}") == slot_for(name)
        assert slot_for(f"{{x}}\x1f{name}".encode()) == slot_for(name)  # braces in a tenant


def test_every_service_name_has_a_registered_plugin() -> None:
    from nodes.config import SERVICES as NAMES
    from nodes.services import SERVICES

    assert tuple(SERVICES) == NAMES
    for name, cls in SERVICES.items():
        assert cls.name == name and cls.descriptor.full_name.endswith("Service")


def test_plugins_are_loaded_by_name_or_refused_clearly() -> None:
    from nodes.services import registry

    assert registry(("tests.toy_counter:CounterService",))["counter"].name == "counter"
    for bad in ("tests.toy_counter:Nothing", "no_such_module:X", "tests.toy_counter"):
        with pytest.raises(ValueError, match="cannot load"):
            registry((bad,))
