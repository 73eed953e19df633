"""The gateway's WebSocket (``/v1/ws``) and notification routes, on real processes.

One cluster for the module: etcd, a coordinator and three nodes (R = 1, 2 s
leases) that require tokens, and the gateway as a child process; the socket is
driven with the ``websockets`` client. The tests run in order: the last one
SIGKILLs a node.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from clients import Mesh, NewEvent
from common.localmesh import Etcd, GatewayProcess, LocalMesh, NodeProcess
from tests.cluster import TOKEN, auth_flags
from tests.conftest import module_cluster, non_owner

AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cluster(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Three nodes (R = 1, 2 s leases) that require tokens."""
    yield from module_cluster(etcd, tmp_path_factory, "gwws", 3, auth_flags, lease_ttl=2)


@pytest.fixture(scope="module")
def gateway(cluster: LocalMesh) -> GatewayProcess:
    return cluster.start_gateway(["--ws-heartbeat", "1", "--ws-idle-timeout", "2",
                                  "--max-body-bytes", "4096"])


@pytest.fixture
async def mesh(cluster: LocalMesh) -> AsyncIterator[Mesh]:
    async with Mesh(etcd=cluster.etcd_endpoint, cluster=cluster.cluster, token=TOKEN) as m:
        yield m


def ws_url(gateway: GatewayProcess) -> str:
    return gateway.url.replace("http://", "ws://") + "/v1/ws"


async def frame(ws: ClientConnection, kind: str | None = None,
                timeout: float = 10) -> dict[str, Any]:
    """The next frame (of ``kind``, skipping heartbeats and others)."""
    while True:
        got: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if got["type"] == "heartbeat" and kind != "heartbeat":
            continue
        if kind is None or got["type"] == kind:
            return got


async def opened(gateway: GatewayProcess, token: str = TOKEN) -> ClientConnection:
    ws = await connect(ws_url(gateway))
    await ws.send(json.dumps({"type": "auth", "token": token}))
    welcome = await frame(ws)
    assert welcome == {"type": "welcome", "heartbeat": 1.0}
    return ws


def field_of(error: dict[str, Any]) -> str:
    [bad] = [d for d in error["details"] if d["@type"].endswith("BadRequest")]
    name: str = bad["field_violations"][0]["field"]
    return name


def text(b64: str) -> str:
    return base64.b64decode(b64).decode()


async def publications(ws: ClientConnection, sid: str,
                       count: int) -> tuple[list[tuple[int, str]], str]:
    """The next ``count`` publications of subscription ``sid`` as (offset, data),
    and the cursor of the last."""
    got: list[tuple[int, str]] = []
    cursor = ""
    while len(got) < count:
        f = await frame(ws, "message")
        assert f["id"] == sid
        cursor = f.get("cursor", cursor)
        p = f["message"].get("publication")
        if p is not None:
            assert f["cursor"]
            got.append((int(p["offset"]), text(p["data"])))
    return got, cursor


async def test_notify_routes_over_http(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=AUTH, timeout=10) as http:
        sent = await http.post("/v1/channels/room.1:publish", json={"data": "aGk="})
        assert sent.status_code == 200, sent.text
        assert sent.json()["offset"] == "1" and sent.json()["epoch"]
        info = (await http.get("/v1/channels/room.1")).json()
        assert info["last_offset"] == "1"
        history = (await http.get("/v1/channels/room.1/history")).json()
        assert [text(p["data"]) for p in history["publications"]] == ["hi"]
        await http.post("/v1/inboxes/ann:send", json={"data": "b25l"})
        await http.post("/v1/inboxes/ann:send", json={"data": "dHdv"})
        inbox = (await http.get("/v1/inboxes/ann")).json()
        assert inbox["unread_count"] == "2" and len(inbox["items"]) == 2
        acked = (await http.post("/v1/inboxes/ann:ack", json={"cursor": "1"})).json()
        assert acked["unread_count"] == "1"
        joined = await http.post("/v1/channels/room.1/presence:join",
                                 json={"client_id": "tab-1", "user": "ann", "ttl": "30s"})
        assert joined.status_code == 200, joined.text
        present = (await http.get("/v1/channels/room.1/presence")).json()
        assert [m["client_id"] for m in present["members"]] == ["tab-1"]
        stats = (await http.get("/v1/channels/room.1/presence:stats")).json()
        assert stats == {"num_clients": 1, "num_users": 1}
        left = (await http.post("/v1/channels/room.1/presence:leave",
                                json={"client_id": "tab-1"})).json()
        assert left["was_present"] is True
        # Bad input at the edge names the field; a missing token is the node's 401.
        bad = await http.post("/v1/channels/room.1:publish", json={"data": 5})
        assert bad.status_code == 400 and "data" in bad.text
        anonymous = await http.get("/v1/channels/room.1", headers={"authorization": ""})
        assert anonymous.status_code == 401


async def test_a_subscription_delivers_and_a_new_socket_resumes_by_cursor(
    gateway: GatewayProcess, mesh: Mesh
) -> None:
    ws = await opened(gateway)
    await ws.send(json.dumps({"type": "subscribe", "id": "c", "rpc": "notify.Subscribe",
                              "request": {"channels": [{"channel": "ws.news"}]}}))
    state = await frame(ws, "message")
    assert state["message"]["confirmation"]["subscription_id"]
    state = await frame(ws, "message")
    assert state["message"]["state"]["channel"] == "ws.news" and state["cursor"]
    for i in range(10):
        await mesh.notify.publish("ws.news", f"m{i}")
    first, cursor = await publications(ws, "c", 10)
    assert first == [(i + 1, f"m{i}") for i in range(10)]
    await ws.close()
    for i in range(10, 20):
        await mesh.notify.publish("ws.news", f"m{i}")
    # A new socket, the last cursor: exactly the ten published meanwhile.
    ws = await opened(gateway)
    await ws.send(json.dumps({"type": "subscribe", "id": "c", "rpc": "notify.Subscribe",
                              "request": {"channels": [{"channel": "ws.news"}]},
                              "cursor": cursor}))
    resumed, _ = await publications(ws, "c", 10)
    assert resumed == [(i + 1, f"m{i}") for i in range(10, 20)]
    # An event stream on the same socket, from its first version.
    await mesh.events.append("ws-orders", [NewEvent("Placed", b"1"), NewEvent("Paid", b"2")])
    await ws.send(json.dumps({"type": "subscribe", "id": "e", "rpc": "events.Subscribe",
                              "request": {"stream": "ws-orders"}}))
    versions: list[str] = []
    while len(versions) < 2:
        f = await frame(ws, "message")
        if f["id"] == "e" and "event" in f["message"]:
            versions.append(f["cursor"])
    assert versions == ["1", "2"]
    await ws.send(json.dumps({"type": "unsubscribe", "id": "e"}))
    await ws.send(json.dumps({"type": "ping"}))
    assert (await frame(ws, "pong")) == {"type": "pong"}
    await ws.close()


async def test_an_inbox_and_a_cache_watch_share_a_socket(
    gateway: GatewayProcess, mesh: Mesh
) -> None:
    ws = await opened(gateway)
    await ws.send(json.dumps({"type": "subscribe", "id": "i", "rpc": "notify.Subscribe",
                              "request": {"inbox": "ws-bob"}}))
    await ws.send(json.dumps({"type": "subscribe", "id": "w", "rpc": "cache.Watch",
                              "request": {"keys": ["ws:watched"]}}))
    started: set[str] = set()
    while started != {"i", "w"}:  # the inbox's state, the watch's confirmation
        f = await frame(ws, "message")
        if f["id"] == "w" or "state" in f["message"]:
            started.add(f["id"])
    await mesh.notify.send("ws-bob", "hello bob")
    await mesh.cache.set("ws:watched", b"v1")
    got: dict[str, dict[str, Any]] = {}
    while len(got) < 2:
        f = await frame(ws, "message")
        if "inbox_item" in f["message"] or "event" in f["message"]:
            got[f["id"]] = f
    item = got["i"]["message"]["inbox_item"]
    assert (item["user"], text(item["data"]), item["cursor"]) == ("ws-bob", "hello bob", "1")
    assert json.loads(got["i"]["cursor"])["i"][1] == 1
    change = got["w"]["message"]["event"]
    assert change["key"] == "ws:watched" and text(change["value"]) == "v1"
    assert got["w"]["cursor"] == got["w"]["message"]["seq"]
    await ws.close()


async def test_bad_frames_get_errors_naming_the_field(gateway: GatewayProcess) -> None:
    ws = await opened(gateway)
    cases: list[tuple[str, str]] = [
        ("not json", "frame"),
        ("[1, 2]", "frame"),
        (json.dumps({"type": "dance"}), "type"),
        (json.dumps({"type": "subscribe", "id": "x", "rpc": "cache.Get"}), "rpc"),
        (json.dumps({"type": "subscribe", "id": "", "rpc": "notify.Subscribe"}), "id"),
        (json.dumps({"type": "subscribe", "id": "x", "rpc": "notify.Subscribe",
                     "request": {"chanels": []}}), "request.chanels"),
        (json.dumps({"type": "subscribe", "id": "x", "rpc": "notify.Subscribe",
                     "request": {"channels": [{"channel": "a"}, {"channel": "b"}]}}),
         "request.channels"),
        (json.dumps({"type": "subscribe", "id": "x", "rpc": "events.Subscribe",
                     "request": {"stream": "s"}, "cursor": "yesterday"}), "cursor"),
        (json.dumps({"type": "unsubscribe", "id": "nope"}), "id"),
    ]
    for sent, field in cases:
        await ws.send(sent)
        error = await frame(ws, "error")
        assert error["error"]["code"] == 3 and field_of(error["error"]) == field, (sent, error)
    # A long name is quoted capped, not whole (the frame's limit is 4 KiB here).
    await ws.send(json.dumps({"type": "subscribe", "id": "x", "rpc": "notify.Subscribe",
                              "request": {"c" * 3_000: []}}))
    error = await frame(ws, "error")
    named = field_of(error["error"])
    assert named.startswith("request.ccc") and named.endswith("\u2026") and len(named) == 200
    assert len(json.dumps(error)) < 2_000
    # A frame over --max-body-bytes closes the socket (1009, message too big).
    await ws.send("x" * 5000)
    with pytest.raises(Exception):  # noqa: B017 - websockets' ConnectionClosed
        await frame(ws, "never")
    assert ws.close_code == 1009


async def test_a_refused_token_ends_the_subscription_not_the_socket(
    gateway: GatewayProcess
) -> None:
    ws = await opened(gateway, token="not-a-token")
    await ws.send(json.dumps({"type": "subscribe", "id": "c", "rpc": "notify.Subscribe",
                              "request": {"channels": [{"channel": "ws.secret"}]}}))
    error = await frame(ws, "error")
    assert error["id"] == "c" and error["error"]["code"] == 16  # UNAUTHENTICATED
    await ws.send(json.dumps({"type": "ping"}))
    assert (await frame(ws, "pong"))["type"] == "pong"
    await ws.close()


async def test_an_idle_socket_is_closed(gateway: GatewayProcess) -> None:
    ws = await opened(gateway)
    with pytest.raises(Exception):  # noqa: B017 - websockets' ConnectionClosed
        while True:
            await frame(ws, "never", timeout=10)
    assert ws.close_code == 1000 and ws.close_reason == "idle"


def _owner(cluster: LocalMesh, key: str) -> NodeProcess:
    others = set(non_owner(cluster, key))
    [owner] = [n for n in cluster.nodes if n.address not in others]
    return owner


async def test_subscriptions_survive_their_node_being_sigkilled(
    gateway: GatewayProcess, cluster: LocalMesh, mesh: Mesh
) -> None:
    channel, stream = "ws.fo", "ws-fo"
    ws = await opened(gateway)
    await ws.send(json.dumps({"type": "subscribe", "id": "c", "rpc": "notify.Subscribe",
                              "request": {"channels": [{"channel": channel}]}}))
    await ws.send(json.dumps({"type": "subscribe", "id": "e", "rpc": "events.Subscribe",
                              "request": {"stream": stream}}))
    got: dict[str, list[str]] = {"c": [], "e": []}

    async def collect(until: int) -> None:
        while len(got["c"]) < until or len(got["e"]) < until:
            f = await frame(ws, "message", timeout=30)
            m = f["message"]
            if "publication" in m:
                got["c"].append(text(m["publication"]["data"]))
            elif "event" in m:
                got["e"].append(text(m["event"]["data"]))

    # Wait until both streams are live (their first state / no event yet).
    await mesh.notify.publish(channel, "p0")
    await mesh.events.append(stream, NewEvent("E", b"e0"))
    await collect(1)
    for i in range(1, 20):
        await mesh.notify.publish(channel, f"p{i}")
        await mesh.events.append(stream, NewEvent("E", f"e{i}".encode()))
    victim = _owner(cluster, channel)
    victim.child.kill()
    # Acknowledged writes after the kill (the typed client waits out the failover).
    for i in range(20, 40):
        await mesh.notify.publish(channel, f"p{i}", timeout=30)
        await mesh.events.append(stream, NewEvent("E", f"e{i}".encode()), timeout=30)
    await collect(40)
    assert got["c"] == [f"p{i}" for i in range(40)]
    assert got["e"] == [f"e{i}" for i in range(40)]
    await ws.close()
