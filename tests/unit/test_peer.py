"""Peer credentials and the map's rules on who may replicate (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.clustermap import RoutingTable
from common.peer import COORDINATOR, LIFETIME, NODE, PEER_HEADER, PeerKey, PeerRefused, PeerSigner
from mesh.admin.v1 import admin_pb2
from mesh.replication.v1 import replication_pb2 as rpb
from meshctl.__main__ import main as meshctl_main
from nodes.replication.permission import Verdict, may_copy, replicate_verdict

SECRET = b"0123456789abcdef-cluster-secret"
NOW = 1_800_000_000.0


def test_a_signed_credential_names_its_peer() -> None:
    key = PeerKey(SECRET, "prod")
    peer = key.verify(key.sign(NODE, "node-a.example:7000", now=NOW), now=NOW + 1)
    assert (peer.kind, peer.id, peer.is_node) == (NODE, "node-a.example:7000", True)
    coordinator = key.verify(key.sign(COORDINATOR, "coord-1", now=NOW), now=NOW)
    assert not coordinator.is_node


@pytest.mark.parametrize(("credential", "reason"), [
    ("", "malformed"),
    ("v1:node:123", "malformed"),
    ("v2:node:1800000060000:00:node-a", "malformed"),
    ("v1:root:1800000060000:00:node-a", "malformed"),
    ("v1:node:soon:00:node-a", "malformed"),
    ("v1:node:1800000060000:00:" + "x" * 500, "malformed"),
    ("v1:node:1800000060000:00:node-a", "forged"),
])
def test_malformed_and_unsigned_credentials_are_refused(credential: str, reason: str) -> None:
    with pytest.raises(PeerRefused) as info:
        PeerKey(SECRET, "prod").verify(credential, now=NOW)
    assert info.value.reason == reason


def test_another_secret_or_cluster_or_a_changed_field_is_forged() -> None:
    key = PeerKey(SECRET, "prod")
    good = key.sign(NODE, "node-a", now=NOW)
    for other in (PeerKey(b"another-secret-of-16+", "prod"), PeerKey(SECRET, "staging")):
        with pytest.raises(PeerRefused, match="not signed"):
            other.verify(good, now=NOW)
    version, kind, expires, mac, peer_id = good.split(":", 4)
    for changed in (f"{version}:{COORDINATOR}:{expires}:{mac}:{peer_id}",
                    f"{version}:{kind}:{int(expires) + 1000}:{mac}:{peer_id}",
                    f"{version}:{kind}:{expires}:{mac}:node-b"):
        with pytest.raises(PeerRefused) as info:
            key.verify(changed, now=NOW)
        assert info.value.reason == "forged"


def test_credentials_expire_and_may_not_live_long() -> None:
    key = PeerKey(SECRET, "prod")
    credential = key.sign(NODE, "node-a", now=NOW)
    key.verify(credential, now=NOW + LIFETIME)  # within the forgiven skew
    with pytest.raises(PeerRefused) as info:
        PeerKey(SECRET, "prod").verify(credential, now=NOW + LIFETIME + 10)
    assert info.value.reason == "expired"
    # A cached check does not outlive the credential either.
    with pytest.raises(PeerRefused):
        key.verify(credential, now=NOW + LIFETIME + 10)
    with pytest.raises(PeerRefused, match="too long"):
        key.verify(key.sign(NODE, "node-a", lifetime=3600, now=NOW), now=NOW)


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        PeerKey(b"short", "prod")


def test_missing_credential_and_open_plane_signer() -> None:
    with pytest.raises(PeerRefused) as info:
        PeerKey(SECRET, "prod").check({})
    assert info.value.reason == "missing"
    assert PeerSigner(None, NODE, "node-a").metadata() == ()
    signer = PeerSigner(PeerKey(SECRET, "prod"), NODE, "node-a")
    ((header, credential),) = signer.metadata()
    assert header == PEER_HEADER and signer.metadata()[0][1] == credential  # reused


def _table(epoch: int = 7, primary: str = "a", replicas: tuple[str, ...] = ("b",)
           ) -> RoutingTable:
    group = admin_pb2.Group(group_id=3, epoch=epoch, primary_node_id=primary)
    for replica in replicas:
        group.replicas.add(node_id=replica, in_sync=True)
    return RoutingTable(admin_pb2.ClusterMap(epoch=20, groups=[group]))


def _batch(sender: str, epoch: int = 7, group_id: int = 3) -> rpb.CommandBatch:
    return rpb.CommandBatch(group_id=group_id, epoch=epoch, primary_node_id=sender)


@pytest.mark.parametrize(("batch", "sender", "verdict"), [
    (_batch("a"), "a", Verdict.APPLY),
    (_batch("c"), "c", Verdict.DENY),  # a member, not the primary
    (_batch("a"), "c", Verdict.DENY),  # posing as the primary
    (_batch("b"), "b", Verdict.DENY),  # a replica is not the primary either
    (_batch("a", epoch=6), "a", Verdict.STALE),  # deposed: told so, nothing changes
    (_batch("c", epoch=6), "c", Verdict.STALE),
    (_batch("a", epoch=8), "a", Verdict.WAIT),  # our map may lag: wait for it
    (_batch("a", group_id=4), "a", Verdict.WAIT),  # a group our map does not show yet
])
def test_only_the_maps_primary_at_the_maps_epoch_may_replicate(
        batch: rpb.CommandBatch, sender: str, verdict: Verdict) -> None:
    assert replicate_verdict(_table(), batch, sender) is verdict


def test_no_map_yet_means_wait() -> None:
    assert replicate_verdict(None, _batch("a"), "a") is Verdict.WAIT


def test_only_members_may_copy_a_group() -> None:
    table = _table()
    assert may_copy(table, 3, "a") and may_copy(table, 3, "b")
    assert not may_copy(table, 3, "c")
    assert not may_copy(table, 4, "b")
    assert not may_copy(None, 3, "b")


def test_meshctl_secret_writes_a_private_usable_secret_once(tmp_path: Path) -> None:
    path = tmp_path / "cluster-secret"
    assert meshctl_main(["secret", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    PeerKey.from_file(path, "prod")  # long enough to use
    first = path.read_text()
    assert meshctl_main(["secret", str(path)]) == 1  # never overwritten
    assert path.read_text() == first
