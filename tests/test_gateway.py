"""The HTTP/JSON gateway (`python -m gateway`) in front of a real cluster.

One cluster for the module: etcd, a coordinator and three nodes with bearer
authentication (two tenants), and the gateway as a real child process on a
free port, called with httpx. The requests here are the README's curl
examples. The node-killing test runs last: it takes a node away.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import html
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from common.localmesh import (
    Etcd,
    GatewayProcess,
    LocalMesh,
    NodeProcess,
    RedisServer,
    child_environment,
)
from gateway.__main__ import public_services
from gateway.rules import routes_of
from tests.conftest import module_cluster, non_owner

TOKEN = "gw-acme-token"
OTHER = "gw-globex-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PUBLIC = ("/mesh.cache.v1.", "/mesh.lock.v1.", "/mesh.events.v1.", "/mesh.scheduler.v1.",
          "/mesh.notify.v1.", "/mesh.saga.v1.")


def _auth_flags(workdir: Path) -> list[str]:
    tokens = workdir / "tokens"
    tokens.write_text(f"{TOKEN} acme\n{OTHER} globex\n")
    return ["--auth-tokens", str(tokens)]


@pytest.fixture(scope="module")
def cluster(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    yield from module_cluster(etcd, tmp_path_factory, "gw", 3, _auth_flags)


@pytest.fixture(scope="module")
def gateway(cluster: LocalMesh) -> GatewayProcess:
    return cluster.start_gateway(["--max-body-bytes", "4096", "--sse-keepalive", "1",
                                  "--cors-origins", "http://app.example"])


@pytest.fixture
async def http(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, headers=AUTH, timeout=10) as client:
        yield client


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def detail(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """The detail of type ``kind`` (ErrorInfo, BadRequest, RetryInfo) of an error body."""
    found = [d for d in body["details"] if d["@type"].endswith(f"google.rpc.{kind}")]
    assert found, body
    first: dict[str, Any] = found[0]
    return first


async def test_cache_routes_round_trip(http: httpx.AsyncClient) -> None:
    put = await http.put("/v1/cache/greeting", json={"value": b64("hello"), "ttl": "60s"})
    assert put.status_code == 200, put.text
    version = put.json()["version"]
    got = (await http.get("/v1/cache/greeting")).json()
    assert got["found"] is True and base64.b64decode(got["value"]) == b"hello"
    assert got["version"] == version and got["expire_time"]
    # A key with '/' and ':' in it, percent-encoded in the path.
    # As `curl -d` sends it (form-urlencoded content type, JSON body).
    assert (await http.put("/v1/cache/a%2Fb:c", content=json.dumps({"value": b64("x")}),
                           headers={"content-type": "application/x-www-form-urlencoded"})
            ).status_code == 200
    assert (await http.get("/v1/cache/a%2Fb:c")).json()["found"] is True
    incr = await http.post("/v1/cache/visits:incr", json={"delta": "2"})
    assert incr.json()["value"] == "2"
    mget = await http.post("/v1/cache:mget", json={"keys": ["greeting", "nope", "visits"]})
    assert [r["found"] for r in mget.json()["results"]] == [True, False, True]
    deleted = await http.delete("/v1/cache/greeting", params={"only_if_version": version})
    assert deleted.json() == {"deleted": True}
    assert (await http.get("/v1/cache/greeting")).json()["found"] is False


async def test_lock_routes_round_trip(http: httpx.AsyncClient) -> None:
    acquired = await http.post("/v1/locks/orders:acquire", json={"owner": "me", "ttl": "30s"})
    assert acquired.status_code == 200, acquired.text
    lease = acquired.json()
    described = (await http.get("/v1/locks/orders")).json()
    assert described["holders"][0]["lease_id"] == lease["lease_id"]
    valid = await http.get("/v1/locks/orders:validate",
                           params={"fencing_token": lease["fencing_token"]})
    assert valid.json()["valid"] is True
    taken = await http.post("/v1/locks/orders:acquire", json={"owner": "you", "ttl": "5s"})
    assert taken.status_code == 409
    assert detail(taken.json(), "ErrorInfo")["reason"] == "LOCK_TIMEOUT"
    released = await http.post("/v1/locks/orders:release", json={"lease_id": lease["lease_id"]})
    assert released.status_code == 200, released.text
    again = await http.post("/v1/locks/orders:release", json={"lease_id": lease["lease_id"]})
    assert again.status_code == 400  # FAILED_PRECONDITION, as grpc-gateway maps it
    body = again.json()
    assert body["code"] == 9 and detail(body, "ErrorInfo")["reason"] == "LOCK_NOT_HELD"
    batch = await http.post("/v1/locks:acquireBatch", json={"requests": [
        {"name": "orders", "ttl": "5s"}, {"name": ""}]})
    assert batch.status_code == 200, batch.text
    granted, bad = batch.json()["outcomes"]
    assert granted["granted"]["lease_id"] and bad["error"]["field"] == "requests[1].name"
    freed = await http.post("/v1/locks:releaseBatch", json={"requests": [
        {"name": "orders", "lease_id": granted["granted"]["lease_id"]}]})
    assert freed.status_code == 200 and freed.json()["outcomes"] == [{}], freed.text


async def test_events_routes_round_trip(http: httpx.AsyncClient) -> None:
    events = [{"id": f"e{i}", "type": "OrderPlaced", "data": b64(json.dumps({"n": i}))}
              for i in range(3)]
    appended = await http.post("/v1/streams/order-42:append", json={
        "events": events, "expected_state": "EXPECTED_STATE_NO_STREAM"})
    assert appended.status_code == 200, appended.text
    assert appended.json()["last_version"] == "3"
    read = (await http.get("/v1/streams/order-42", params={"max_count": 2})).json()
    assert [e["version"] for e in read["events"]] == ["1", "2"]
    backward = await http.get("/v1/streams/order-42",
                              params={"direction": "READ_DIRECTION_BACKWARD", "max_count": "1"})
    assert backward.json()["events"][0]["version"] == "3"
    conflict = await http.post("/v1/streams/order-42:append", json={
        "events": [{"id": "e9", "type": "X"}], "expected_state": "EXPECTED_STATE_NO_STREAM"})
    assert conflict.status_code == 409
    info = detail(conflict.json(), "ErrorInfo")
    assert info["reason"] == "VERSION_MISMATCH" and info["metadata"]["current_version"] == "3"


async def test_scheduler_routes_round_trip(http: httpx.AsyncClient) -> None:
    enqueued = await http.post("/v1/queues/mail/jobs", json={
        "type": "email.send", "payload": b64('{"to": "a@example.com"}')})
    assert enqueued.status_code == 200, enqueued.text
    job_id = enqueued.json()["job_id"]
    claimed = (await http.post("/v1/jobs:claim", json={
        "queues": ["mail"], "worker_id": "w1", "lease_duration": "30s"})).json()
    job = claimed["jobs"][0]
    assert job["job_id"] == job_id
    quoted = httpx.URL(f"/v1/jobs/{job_id}:complete")  # the id holds '{...}': encoded
    done = await http.post(quoted, json={"lease_token": job["lease_token"]})
    assert done.status_code == 200, done.text
    state = (await http.get(f"/v1/jobs/{job_id}")).json()["job"]["state"]
    assert state == "JOB_STATE_SUCCEEDED"
    stats = (await http.get("/v1/queues/mail/stats")).json()
    assert stats["succeeded_total"] == "1" and stats["ready"] == "0"
    unknown = job_id[:-1] + ("1" if job_id[-1] != "1" else "2")
    missing = await http.get(f"/v1/jobs/{unknown}")
    assert missing.status_code == 404, missing.text
    assert detail(missing.json(), "ErrorInfo")["reason"] == "JOB_NOT_FOUND"


async def test_saga_routes_round_trip(http: httpx.AsyncClient) -> None:
    step = {"name": "only", "action": {"queue": "gw-saga-q", "type": "gw.only"}}
    registered = await http.post("/v1/sagaTypes", json={
        "definition": {"name": "gw-saga", "stages": [{"steps": [step]}]}})
    assert registered.status_code == 200, registered.text
    assert registered.json()["version"] == 1
    started = await http.post("/v1/sagas/gw-1:start", json={"type": "gw-saga",
                                                            "input": b64("{}")})
    assert started.status_code == 200, started.text
    assert started.json()["saga"]["state"] == "SAGA_STATE_RUNNING"
    # Its step is a job in the queue: a worker (here, plain HTTP calls) runs it.
    claimed = {}
    for _ in range(100):
        claimed = (await http.post("/v1/jobs:claim", json={
            "queues": ["gw-saga-q"], "worker_id": "w1", "lease_duration": "30s",
            "wait": "1s"})).json()
        if claimed.get("jobs"):
            break
    job = claimed["jobs"][0]
    done = await http.post(httpx.URL(f"/v1/jobs/{job['job_id']}:complete"),
                           json={"lease_token": job["lease_token"]})
    assert done.status_code == 200, done.text
    await http.post("/v1/sagas/gw-1:report", json={"job_id": job["job_id"]})
    saga = (await http.get("/v1/sagas/gw-1", params={"wait": "20s"})).json()["saga"]
    assert saga["state"] == "SAGA_STATE_COMPLETED", saga
    listed = (await http.get("/v1/sagas", params={"type": "gw-saga"})).json()
    assert [s["saga_id"] for s in listed["sagas"]] == ["gw-1"]
    finished = await http.post("/v1/sagas/gw-1:cancel", json={})
    assert finished.status_code == 400, finished.text
    assert detail(finished.json(), "ErrorInfo")["reason"] == "SAGA_FINISHED"
    # The saga's history reaches its event stream in the background: wait for
    # all of it, so that no call of the saga's primary lands in a later test.
    events: list[Any] = []
    for _ in range(100):
        events = (await http.get("/v1/streams/saga-gw-1")).json().get("events", [])
        if len(events) == len(saga["history"]):
            break
        await asyncio.sleep(0.1)
    assert [e["type"] for e in events] == [f"saga.{h['kind']}" for h in saga["history"]]


async def test_node_errors_are_mapped_with_details(http: httpx.AsyncClient) -> None:
    version = int((await http.put("/v1/cache/err:k", json={"value": b64("v")})).json()["version"])
    exists = await http.put("/v1/cache/err:k", json={"value": b64("w"), "only_if_absent": True})
    assert exists.status_code == 409
    assert exists.json()["code"] == 6  # ALREADY_EXISTS
    assert detail(exists.json(), "ErrorInfo") == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "KEY_EXISTS",
        "domain": "mesh", "metadata": {}}
    stale = await http.put("/v1/cache/err:k", json={"value": b64("w"),
                                                    "onlyIfVersion": str(version + 7)})
    assert stale.status_code == 409 and stale.json()["code"] == 10  # ABORTED
    info = detail(stale.json(), "ErrorInfo")
    assert (info["reason"], info["metadata"]["current_version"]) == (
        "VERSION_MISMATCH", str(version))
    # Checked by the node (the gateway does not know the key's length limit).
    long = await http.get("/v1/cache/" + "k" * 1100)
    assert long.status_code == 400
    violations = detail(long.json(), "BadRequest")["field_violations"]
    assert violations[0]["field"] == "key"


async def test_tokens_pass_through_to_the_node(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as anonymous:
        missing = await anonymous.get("/v1/cache/auth:k")
        assert missing.status_code == 401
        assert detail(missing.json(), "ErrorInfo")["reason"] == "TOKEN_MISSING"
        wrong = await anonymous.get("/v1/cache/auth:k",
                                    headers={"authorization": "Bearer not-a-token"})
        assert wrong.status_code == 401
        assert detail(wrong.json(), "ErrorInfo")["reason"] == "TOKEN_INVALID"
        # Each tenant sees its own namespace: the node decides, from the token.
        acme = {"authorization": f"Bearer {TOKEN}"}
        globex = {"authorization": f"Bearer {OTHER}"}
        await anonymous.put("/v1/cache/auth:k", json={"value": b64("acme")}, headers=acme)
        assert (await anonymous.get("/v1/cache/auth:k", headers=acme)).json()["found"]
        theirs = await anonymous.get("/v1/cache/auth:k", headers=globex)
        assert theirs.json()["found"] is False


def _public_calls(cluster: LocalMesh) -> float:
    """Public RPCs served so far by every node (from their /metrics)."""
    total = 0.0
    for node in cluster.nodes:
        with urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            if line.startswith("mesh_rpc_requests_total{") and any(
                    f'method="{p}' in line for p in PUBLIC):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def test_bad_input_is_refused_at_the_edge(
    http: httpx.AsyncClient, cluster: LocalMesh
) -> None:
    before = await asyncio.to_thread(_public_calls, cluster)
    cases: list[tuple[httpx.Response, int, str]] = [
        (await http.put("/v1/cache/k", content=b"{not json"), 400, "body"),
        (await http.put("/v1/cache/k", json=[1, 2]), 400, "body"),
        (await http.put("/v1/cache/k", json={"value": 5}), 400, "value"),
        (await http.put("/v1/cache/k", json={"value": "aGk=", "colour": "red"}), 400,
         "colour"),
        (await http.put("/v1/cache/k", json={"ttl": "soon"}), 400, "ttl"),
        (await http.put("/v1/cache/k", json={"key": "other"}), 400, "key"),
        (await http.post("/v1/streams/s:append", json={"events": [{"tpye": "X"}]}), 400,
         "events[0].tpye"),
        (await http.get("/v1/cache/k", params={"colour": "red"}), 400, "colour"),
        (await http.get("/v1/streams/s", params={"direction": "SIDEWAYS"}), 400, "direction"),
        (await http.put("/v1/cache/k", json={"value": "a" * 5000}), 413, "body"),
        (await http.put("/v1/cache/k", content=b"x", headers={"content-type": "text/plain"}),
         415, "content-type"),
        (await http.get("/v2/nothing"), 404, "path"),
        (await http.post("/v1/cache/k"), 405, "method"),
    ]
    for response, status, field in cases:
        assert response.status_code == status, (field, response.text)
        body = response.json()
        assert detail(body, "BadRequest")["field_violations"][0]["field"] == field, body
    assert cases[-1][0].headers["allow"] == "DELETE, GET, PUT"

    # A streamed oversized body (no Content-Length) is cut off while read.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    streamed = await http.put("/v1/cache/k", content=chunks())
    assert streamed.status_code == 413
    assert await asyncio.to_thread(_public_calls, cluster) == before


async def test_an_edge_refusal_never_echoes_the_callers_input_whole(
    http: httpx.AsyncClient
) -> None:
    """A refusal may quote what it refuses (a path, a parameter's or field's name),
    but capped: a 12,000-character name must not come back three times over (nor
    a 3,000-character one, in a body this gateway's 4 KiB limit lets through)."""
    # 12,000, not more: h11 refuses a request head past 16 KiB only when it arrives
    # in pieces, so a longer one was answered or cut off by how TCP split it.
    long, mid = "q" * 12_000, "q" * 3_000
    cases: list[tuple[httpx.Response, int, str]] = [
        (await http.get(f"/v1/{long}"), 404, "path"),
        (await http.post(f"/v1/{long}/x"), 404, "path"),
        (await http.get("/v1/cache/k", params={long: "1"}), 400, long),
        (await http.put("/v1/cache/k", json={mid: 1}), 400, mid),
        (await http.post("/v1/streams/s:append", json={"events": [{mid: 1}]}), 400,
         f"events[0].{mid}"),
        (await http.put("/v1/cache/k", content=b"x",
                        headers={"content-type": "text/" + "p" * 8_000}), 415, "content-type"),
    ]
    for response, status, field in cases:
        assert response.status_code == status, (field[:20], response.text[:200])
        assert len(response.content) < 2_000, (field[:20], len(response.content))
        body = response.json()
        named = detail(body, "BadRequest")["field_violations"][0]["field"]
        assert named == field or (named.endswith("\u2026") and field.startswith(named[:-1])), \
            named[:40]
    # Input within bounds still comes back as it was.
    short = await http.get("/v1/cache/k", params={"colour": "red"})
    assert short.json()["message"] == "colour: unknown query parameter"


async def test_the_access_log_quotes_a_path_on_one_capped_line(
    http: httpx.AsyncClient, gateway: GatewayProcess
) -> None:
    """The access log quotes the decoded path: a ``%0A`` in it must not start a line
    of the caller's making, nor a 12,000-character path make a 12 kB line."""
    forged = "2026-12-05 12:00:00,000 INFO gateway.access: GET /v1/admin"
    forgery = await http.get("/v1/cache/forgery-probe%0A" + forged.replace(" ", "%20"))
    # Under h11's 16 KiB request head, as in the test above.
    long_path = await http.get("/v1/cache/long-probe-" + "q" * 12_000)
    # Lines are written by the gateway's log thread: on a loaded machine (the whole
    # suite in three workers on two cores) 5 s once was not enough for the second.
    for _ in range(400):
        lines = gateway.child.log_tail(200).splitlines()
        probes = [line for line in lines if "forgery-probe" in line or "long-probe" in line]
        if len(probes) == 2:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(
            f"the access lines never came (answers {forgery.status_code} and "
            f"{long_path.status_code}): {probes}; the log's last lines: {lines[-5:]}")
    assert not any(line.startswith(forged) for line in lines)
    [escaped] = [line for line in probes if "forgery-probe" in line]
    assert "forgery-probe\\n" + forged in escaped
    [long] = [line for line in probes if "long-probe" in line]
    assert 500 < len(long) < 700 and "\u2026" in long


async def test_cors_preflight_and_health(http: httpx.AsyncClient) -> None:
    preflight = await http.options("/v1/cache/k", headers={
        "origin": "http://app.example", "access-control-request-method": "PUT",
        "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    other = await http.options("/v1/cache/k", headers={
        "origin": "http://evil.example", "access-control-request-method": "PUT"})
    assert other.status_code == 400
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["map_loaded"] is True
    metrics = (await http.get("/metrics")).text
    assert 'mesh_gateway_http_requests_total{method="PUT",route="mesh.cache.v1.CacheService/Set"' \
        in metrics
    assert "mesh_gateway_map_loaded 1.0" in metrics


async def test_openapi_lists_every_route_and_validates(http: httpx.AsyncClient) -> None:
    doc = (await http.get("/openapi.json")).json()
    validate(doc)
    routes = routes_of(public_services())
    assert len(routes) == 59
    for route in routes:
        operation = doc["paths"][route.template][route.http_method.lower()]
        assert route.path in operation["description"]
    assert doc["paths"]["/v1/cache/{key}"]["get"]["summary"].startswith("Get returns")
    page = (await http.get("/docs")).text
    assert all(html.escape(path) in page for path in doc["paths"])


README = Path(__file__).resolve().parent.parent / "README.md"
EDGE_REFUSALS = {"ROUTE_NOT_FOUND", "METHOD_NOT_ALLOWED", "BODY_TOO_LARGE",
                 "UNSUPPORTED_MEDIA_TYPE", "INVALID_ARGUMENT"}


def _readme_curls() -> list[str]:
    """The curl commands of the README's Gateway section (continuation lines joined)."""
    section = README.read_text().split("\n## Gateway\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines()
            if c.strip().startswith("curl")]


def test_readme_curl_examples_are_well_formed(gateway: GatewayProcess) -> None:
    """Every curl line of the README, as written, reaches a node: no edge refusal, no
    bad argument (placeholders filled in; their answers may be refusals of the node,
    such as LOCK_NOT_HELD for a made-up lease id)."""
    commands = _readme_curls()
    assert len(commands) >= 15
    filled = {"<lease_id>": "0f0f", "<job_id>": "{mail}1-1", "<lease_token>": "1"}
    for command in commands:
        for placeholder, value in filled.items():
            command = command.replace(placeholder, value)
        streaming = " -N " in command
        flags = f"-s --max-time {1 if streaming else 10} -w '\\n%{{http_code}}'"
        script = (f'G={gateway.url}; A="Authorization: Bearer $MESH_TOKEN"; '
                  + command.replace("curl ", f"curl {flags} ", 1))
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                timeout=30, check=False, env={"MESH_TOKEN": TOKEN,
                                                              "PATH": "/usr/bin:/bin"})
        body, _, status = result.stdout.rpartition("\n")
        if streaming:  # cut off by --max-time while streaming
            assert status == "200" and "\ndata: {" in "\n" + body, (command, result.stdout)
            continue
        assert status.isdigit(), (command, result)
        if int(status) >= 400:
            error = json.loads(body)
            reasons = {d.get("reason") for d in error["details"]}
            assert error["code"] != 3 and not reasons & EDGE_REFUSALS, (command, body)


def test_help_shows_defaults_and_env() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True,
                            text=True, timeout=30, check=True)
    assert "MESH_GATEWAY_LISTEN" in result.stdout
    assert "default: 127.0.0.1:8080" in result.stdout.replace("\n", " ").replace("  ", " ")


async def test_rate_limits_per_ip_and_token(cluster: LocalMesh) -> None:
    # A token's bucket holds one request and refills in 5 s; the IP's holds three.
    limited = cluster.start_gateway(["--rate-limit-ip", "3", "--rate-limit-token", "0.2"])
    async with httpx.AsyncClient(base_url=limited.url, timeout=10) as client:
        other = {"authorization": f"Bearer {OTHER}"}
        assert (await client.get("/v1/cache/rl", headers=AUTH)).status_code == 200
        per_token = await client.get("/v1/cache/rl", headers=AUTH)
        assert per_token.status_code == 429
        assert int(per_token.headers["retry-after"]) >= 1
        info = detail(per_token.json(), "ErrorInfo")
        assert (info["reason"], info["metadata"]["scope"]) == ("RATE_LIMITED", "token")
        assert detail(per_token.json(), "RetryInfo")["retry_delay"]
        assert (await client.get("/v1/cache/rl", headers=other)).status_code == 200
        # Without a token only the IP's bucket counts (the node then says 401).
        statuses = []
        for _ in range(20):
            response = await client.get("/v1/cache/rl")
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        assert statuses[-1] == 429, statuses
        assert detail(response.json(), "ErrorInfo")["metadata"]["scope"] == "client IP"
        metrics = (await client.get("/metrics")).text
        assert 'mesh_gateway_rate_limited_total{scope="token"} 1.0' in metrics
    assert limited.child.stop() == 0  # SIGTERM: a clean exit


async def test_redis_limits_hold_across_gateways(cluster: LocalMesh, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        flags = ["--rate-limit-token", "0.2", "--rate-limit-redis", redis.url]
        first, second = cluster.start_gateway(flags), cluster.start_gateway(flags)
        async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
            assert (await client.get(f"{first.url}/v1/cache/rl2")).status_code == 200
            # The other gateway draws from the same bucket, kept in Redis.
            refused = await client.get(f"{second.url}/v1/cache/rl2")
            assert refused.status_code == 429, refused.text
        for gateway in (first, second):
            gateway.child.stop()
    finally:
        redis.stop()


async def _sse(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The events of an SSE response: {"event", "id", "data"} (comments as {"comment"})."""
    event: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


async def _next_data(events: AsyncIterator[dict[str, str]]) -> dict[str, str]:
    while True:
        event = await asyncio.wait_for(anext(events), 10)
        if "comment" not in event:
            return event


async def test_subscribe_resumes_from_last_event_id(http: httpx.AsyncClient) -> None:
    await http.post("/v1/streams/sse-1:append", json={"events": [
        {"id": f"s{i}", "type": "T", "data": b64("{}")} for i in range(3)]})
    headers = {"last-event-id": "1"}
    async with http.stream("GET", "/v1/streams/sse-1:subscribe", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response)
        seen: list[str] = []
        while len(seen) < 2:
            event = await _next_data(events)
            if json.loads(event["data"]).get("event"):
                seen.append(event["id"])
        assert seen == ["2", "3"]
    async with http.stream("GET", "/v1/streams/sse-1:subscribe",
                           params={"start": "SIDEWAYS"}) as bad:
        assert bad.status_code == 400
    # The client went away: the gateway ended the node's stream too.
    for _ in range(50):
        if "mesh_gateway_sse_streams 0.0" in (await http.get("/metrics")).text:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the gateway still counts the stream as open")


async def test_watch_delivers_and_ends_with_an_error_when_the_node_dies(
    http: httpx.AsyncClient, cluster: LocalMesh
) -> None:
    key = "sse:watched"
    async with http.stream("GET", "/v1/cache:watch", params={"keys": key}) as response:
        assert response.status_code == 200
        events = _sse(response)
        created = json.loads((await _next_data(events))["data"])
        assert created["created"] is True and created["heartbeat_interval"]
        await http.put(f"/v1/cache/{key}", json={"value": b64("one")})
        change = await _next_data(events)
        body = json.loads(change["data"])
        assert body["event"]["type"] == "EVENT_TYPE_SET" and change["id"] == body["seq"]
        # The keepalive comment (--sse-keepalive 1) shows on an idle stream.
        comment = await asyncio.wait_for(anext(events), 5)
        assert comment.get("comment") in ("keepalive", "heartbeat")
        owner = _owner(cluster, key)
        owner.child.kill()
        ended = await _next_data(events)
        assert ended["event"] == "error"
        status = json.loads(ended["data"])
        assert status["code"] == 14 and status["last_event_id"] == change["id"]


def _owner(cluster: LocalMesh, key: str) -> NodeProcess:
    """The node leading ``key``'s slot."""
    others = set(non_owner(cluster, key))
    [owner] = [n for n in cluster.nodes if n.address not in others]
    return owner


def test_a_log_reader_that_stops_reading_never_stops_the_gateway(cluster: LocalMesh) -> None:
    # Its stderr a small pipe nobody reads (a stuck log shipper, a paused
    # terminal): the gateway logs every request, and once the pipe is full a
    # write from its event loop would stop the loop, and every request with it
    # (it did). It goes on answering; the lines wait in memory, up to
    # `common.logs.QUEUED` of them (past that they are dropped and counted).
    reader, writer = os.pipe()
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)  # about 40 access lines
    argv = [sys.executable, "-m", "gateway", "--listen", "127.0.0.1:0",
            "--etcd", cluster.etcd_endpoint, "--cluster", cluster.cluster]
    gateway = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=writer,
                               env=child_environment())
    os.close(writer)
    try:
        assert gateway.stdout is not None
        ready = gateway.stdout.readline().decode()
        assert ready.startswith("READY "), ready
        url = json.loads(ready.removeprefix("READY "))["url"]
        with httpx.Client(base_url=url, timeout=5) as client:
            for _ in range(300):
                assert client.get("/healthz").status_code == 200
        # Read again: every line comes out, and the gateway stops cleanly.
        gateway.terminate()
        with os.fdopen(reader, "rb") as log:
            reader = -1
            text = log.read().decode(errors="replace")
        assert gateway.wait(15) == 0, text[-2000:]
        assert text.count("GET /healthz") == 300, text[-2000:]
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        if reader >= 0:
            os.close(reader)
