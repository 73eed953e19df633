"""Mesh is callable without the Python client: grpcurl and Node.js against real nodes.

grpcurl knows nothing but what server reflection tells it, and the Node example
(clients/node) loads the .proto files at run time with @grpc/proto-loader, so
these tests check the wire contract itself. They run on a three-node cluster and
call nodes that do NOT lead the key: those forward to the owner, so any node is
an entry point. Data written from one language is read back from another to
show they all see the same cache.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients import Mesh
from common.localmesh import LocalMesh, free_port, tool
from tests.conftest import non_owner

ROOT = Path(__file__).resolve().parent.parent
NODE_EXAMPLE = ROOT / "clients" / "node"
SUBPROCESS_LIMIT = 30.0  # seconds; every child process is killed after this
INVALID_ARGUMENT_EXIT = 64 + 3  # grpcurl exits with 64 + the gRPC status code


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def run(*argv: str, seconds: float = SUBPROCESS_LIMIT) -> Result:
    """Run a command from the repository root; kill it and fail if it overruns."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(seconds):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(argv)} did not finish within {seconds}s")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def grpcurl(address: str, *args: str, data: object = None) -> Result:
    """``grpcurl -plaintext [-d json] address args...`` with its own 10 s deadline."""
    argv = [tool("grpcurl"), "-plaintext", "-max-time", "10"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return await run(*argv, address, *args)


def node_example() -> list[str]:
    """argv prefix for the Node example; fails (never skips) when it is not set up."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js >= 18) is not on PATH; install it, then run `make setup`")
    if not (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"{NODE_EXAMPLE / 'node_modules'} is missing: run `make setup` "
                    "(it runs `npm ci` in clients/node)")
    return [node, str(Path("clients", "node", "cache_example.js"))]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def address(shared_cluster: LocalMesh) -> str:
    return shared_cluster.nodes[0].address


# -- grpcurl -------------------------------------------------------------------


async def test_grpcurl_lists_every_public_service_and_nothing_internal(address: str) -> None:
    result = await grpcurl(address, "list")
    assert result.returncode == 0, result.stderr
    listed = set(result.stdout.split())
    assert listed == {
        "mesh.cache.v1.CacheService",
        "mesh.lock.v1.LockService",
        "mesh.events.v1.EventsService",
        "mesh.scheduler.v1.SchedulerService",
        "mesh.notify.v1.NotifyService",
        "mesh.saga.v1.SagaService",
        "mesh.session.v1.SessionService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_grpcurl_describes_the_cache_contract(address: str) -> None:
    service = await grpcurl(address, "describe", "mesh.cache.v1.CacheService")
    assert service.returncode == 0, service.stderr
    for rpc in ("Get", "Set", "Delete", "MGet", "MSet", "Incr", "Stats"):
        assert f"rpc {rpc} ( .mesh.cache.v1.{rpc}Request )" in service.stdout, rpc
    assert "rpc Watch ( .mesh.cache.v1.WatchRequest ) returns ( stream" in service.stdout

    message = await grpcurl(address, "describe", "mesh.cache.v1.SetRequest")
    assert message.returncode == 0, message.stderr
    for field in ("string key = 1;", "bytes value = 2;", ".google.protobuf.Duration ttl = 3;",
                  "bool only_if_absent = 4;", "uint64 only_if_version = 5;"):
        assert field in message.stdout, field


async def test_grpcurl_set_then_get_through_nodes_that_forward(
    shared_cluster: LocalMesh,
) -> None:
    key, value = "grpcurl:greeting", "hello from grpcurl ✓"
    first, second = non_owner(shared_cluster, key)
    # proto3 JSON: bytes are base64, a Duration is a string like "60s".
    set_ = await grpcurl(first, "mesh.cache.v1.CacheService/Set",
                         data={"key": key, "value": b64(value), "ttl": "60s"})
    assert set_.returncode == 0, set_.stderr
    version = json.loads(set_.stdout)["version"]  # uint64 is a JSON string

    get = await grpcurl(second, "mesh.cache.v1.CacheService/Get", data={"key": key})
    assert get.returncode == 0, get.stderr
    reply = json.loads(get.stdout)
    assert reply["found"] is True
    assert base64.b64decode(reply["value"]).decode() == value
    assert reply["version"] == version
    assert "expire_time" in reply  # grpcurl keeps the proto field names


async def test_grpcurl_lock_acquire_validate_release_through_forwarding_nodes(
    shared_cluster: LocalMesh,
) -> None:
    name = "grpcurl:lock"
    first, second = non_owner(shared_cluster, name)
    acquired = await grpcurl(first, "mesh.lock.v1.LockService/Acquire",
                             data={"name": name, "owner": "grpcurl", "ttl": "30s"})
    assert acquired.returncode == 0, acquired.stderr
    lease = json.loads(acquired.stdout)
    token = lease["fencing_token"]  # uint64 is a JSON string

    busy = await grpcurl(second, "mesh.lock.v1.LockService/Acquire",
                         data={"name": name, "wait_timeout": "0.2s"})
    assert busy.returncode == 64 + 10, busy.stderr  # ABORTED
    assert "not acquired in time" in busy.stderr and "LOCK_TIMEOUT" in busy.stderr

    valid = await grpcurl(second, "mesh.lock.v1.LockService/Validate",
                          data={"name": name, "fencing_token": token})
    assert valid.returncode == 0, valid.stderr
    assert json.loads(valid.stdout) == {"valid": True, "current_token": token}

    released = await grpcurl(second, "mesh.lock.v1.LockService/Release",
                             data={"name": name, "lease_id": lease["lease_id"]})
    assert released.returncode == 0, released.stderr
    described = await grpcurl(first, "mesh.lock.v1.LockService/Describe", data={"name": name})
    assert json.loads(described.stdout).get("holders") is None  # empty lists are omitted


async def test_grpcurl_bad_input_is_invalid_argument_naming_the_field(address: str) -> None:
    result = await grpcurl(address, "mesh.cache.v1.CacheService/Set",
                           data={"key": "", "value": b64("v")})
    assert result.returncode == INVALID_ARGUMENT_EXIT, result
    output = result.stdout + result.stderr
    assert "Code: InvalidArgument" in output
    assert "Message: key: must not be empty" in output
    # The google.rpc.Status details, decoded by grpcurl: BadRequest names the field.
    assert "type.googleapis.com/google.rpc.BadRequest" in output
    assert '"field":"key"' in output


async def test_grpcurl_health_check(address: str) -> None:
    result = await grpcurl(address, "grpc.health.v1.Health/Check",
                           data={"service": "mesh.cache.v1.CacheService"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


# -- Node.js -------------------------------------------------------------------


async def test_node_example_round_trips_through_a_forwarding_node(
    shared_cluster: LocalMesh,
) -> None:
    key, value = "node:greeting", "grüße from Node ✓"
    address = non_owner(shared_cluster, key)[0]
    result = await run(*node_example(), address, key, value)
    assert result.returncode == 0, result.stderr

    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # exactly one machine-readable line
    reply = json.loads(lines[0])
    assert reply["key"] == key
    assert reply["value"] == value
    assert reply["found"] is True
    assert reply["version"].isdigit()  # uint64 arrives as a decimal string (longs: String)
    # The example's deliberate empty-key call shows the decoded field violation.
    assert "INVALID_ARGUMENT" in result.stderr
    assert "key: must not be empty" in result.stderr

    # The Python client sees what Node wrote: same bytes, same version, the 60 s TTL.
    async with Mesh(addresses=[address]) as mesh:
        assert await mesh.cache.get(key) == value.encode()
        entry = await mesh.cache.get_entry(key)
    assert entry is not None
    assert entry.version == int(reply["version"])
    assert entry.expire_at is not None
    assert 50 < entry.expire_at - time.time() <= 60


async def test_node_example_reports_errors_with_the_status_code() -> None:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens here
    result = await run(*node_example(), nobody, "node:unreachable", "v")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "UNAVAILABLE (14)" in result.stderr
