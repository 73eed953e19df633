"""Advertised addresses and a node's kept identity (pure logic and the file system)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.addresses import Endpoint, host_of
from common.localmesh import free_ports
from nodes.identity import IdentityError, claim


@pytest.mark.parametrize(("endpoint", "port", "address"), [
    (Endpoint("127.0.0.1:0"), 7000, "127.0.0.1:7000"),
    (Endpoint("0.0.0.0:7000", "node-1.example"), 7000, "node-1.example:7000"),
    (Endpoint("0.0.0.0:0", "10.1.2.3:443"), 7001, "10.1.2.3:443"),
    (Endpoint("[::]:0", "[fd00::1]"), 7002, "[fd00::1]:7002"),
    (Endpoint(":0", "host"), 7003, "host:7003"),
])
def test_the_advertised_address(endpoint: Endpoint, port: int, address: str) -> None:
    assert endpoint.address(port) == address
    assert endpoint.problem("--listen", "--advertise") is None or not endpoint.advertise


@pytest.mark.parametrize("endpoint", [
    Endpoint("0.0.0.0:7000"), Endpoint("[::]:7000"), Endpoint(":7000"),
    Endpoint("0.0.0.0:7000", "0.0.0.0"), Endpoint("127.0.0.1:0", "host:port"),
])
def test_unroutable_addresses_are_refused_naming_the_flag(endpoint: Endpoint) -> None:
    problem = endpoint.problem("--peer-listen", "--peer-advertise")
    assert problem is not None and "--peer-advertise" in problem


def test_host_of() -> None:
    assert host_of("a.example:7000") == "a.example"
    assert host_of("a.example") == "a.example"
    assert host_of("[fd00::1]:7000") == "[fd00::1]"
    assert host_of("fd00::1") == "fd00::1"


def test_a_generated_id_is_kept(tmp_path: Path) -> None:
    first = claim(tmp_path / "a")
    assert (tmp_path / "a" / "node_id").read_text().strip() == first
    # Another directory, another node; the same directory (once free) the same id.
    assert claim(tmp_path / "b") != first


def test_a_data_dir_is_one_nodes(tmp_path: Path) -> None:
    claim(tmp_path / "d", "node-7")
    with pytest.raises(IdentityError, match="in use by another running node"):
        claim(tmp_path / "d", "node-7")


def test_an_id_that_is_not_the_data_dirs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "node_id").write_text("node-1\n")
    with pytest.raises(IdentityError, match="holds the state of node 'node-1'"):
        claim(tmp_path / "e", "node-2")


def test_ports_picked_together_are_distinct() -> None:
    # One after the other the kernel may hand out a port it just gave back.
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(0 < p < 65536 for p in ports)
