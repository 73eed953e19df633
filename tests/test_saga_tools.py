"""The order saga example and ``meshctl saga``, against real processes (3 nodes).

The example's orders end as their payments decide: a declined card leaves no
stock reserved and no charge; the others ship. ``meshctl saga get|list|cancel``
show and stop the sagas (text and ``-o json``), with one-line errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from clients import Mesh
from clients.examples.order_saga import Shop, order_saga, run_orders
from common.localmesh import Etcd, LocalMesh
from tests.conftest import module_cluster

pytestmark = pytest.mark.timeout(120)
MESHCTL = [sys.executable, "-m", "meshctl"]


@pytest.fixture(scope="module")
def trio(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    yield from module_cluster(etcd, tmp_path_factory, "sagatools", 3)


@pytest.fixture
async def mesh(trio: LocalMesh) -> AsyncIterator[Mesh]:
    async with Mesh(etcd=trio.etcd_endpoint, cluster=trio.cluster, timeout=10) as client:
        yield client


def _ctl(trio: LocalMesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHCTL, "--etcd", trio.etcd_endpoint, "--cluster", trio.cluster,
                           *args], capture_output=True, text=True, timeout=60)


async def test_the_order_example_compensates_a_declined_payment(mesh: Mesh) -> None:
    shop = Shop(declined={"b"})
    sagas = await run_orders(mesh, shop, ["a", "b", "c"], queue="orders-example")
    assert [s.state for s in sagas] == ["COMPLETED", "COMPENSATED", "COMPLETED"]
    declined = sagas[1]
    assert "card declined for order b" in declined.error
    assert [h[0] for h in declined.history][-3:] == [
        "compensation_dispatched", "compensation_succeeded", "compensated"]
    assert shop.stock == 100 - 2 * 2 and sum(shop.payments.applied.values()) == 60
    assert sorted(shop.shipped) == ["a", "c"]
    assert len(shop.inventory.undone) == 1


def test_the_example_runs_from_the_command_line(trio: LocalMesh) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clients.examples.order_saga", "--etcd", trio.etcd_endpoint,
         "--cluster", trio.cluster, "--orders", "3", "--fail-order", "2"],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    states = [line.split(": ")[1].split(" ")[0] for line in result.stdout.splitlines()
              if line.startswith("order-")]
    assert states == ["COMPLETED", "COMPENSATED", "COMPLETED"], result.stdout
    assert "stock left 96 (of 100), charged 60, shipped 2" in result.stdout


async def test_meshctl_saga_get_list_cancel(trio: LocalMesh, mesh: Mesh) -> None:
    shop = Shop()
    saga = order_saga(shop, queue="orders-ctl")
    await mesh.sagas.register(saga)
    # No worker runs: the saga waits at its first step, cancellable.
    await mesh.sagas.start(saga, "ctl-1", {"order": "x", "items": 1, "amount": 5})
    listed = await asyncio.to_thread(_ctl, trio, "saga", "list", "--state", "RUNNING")
    assert listed.returncode == 0, listed.stderr
    assert "ctl-1" in listed.stdout and "RUNNING" in listed.stdout
    got = await asyncio.to_thread(_ctl, trio, "-o", "json", "saga", "get", "ctl-1")
    assert got.returncode == 0, got.stderr
    shown = json.loads(got.stdout)
    assert shown["state"] == "RUNNING" and [s["name"] for s in shown["steps"]] == [
        "reserve", "charge", "ship"]
    cancelled = await asyncio.to_thread(_ctl, trio, "saga", "cancel", "ctl-1",
                                        "--reason", "test")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "COMPENSATING" in cancelled.stdout
    async with mesh.sagas.worker(saga, concurrency=2, poll=1):
        done = await mesh.sagas.result("ctl-1", timeout=60)
    assert done.state == "COMPENSATED" and done.error == "cancelled: test"
    text = await asyncio.to_thread(_ctl, trio, "saga", "get", "ctl-1")
    assert "saga ctl-1: COMPENSATED" in text.stdout and "cancel_requested: test" in text.stdout
    again = await asyncio.to_thread(_ctl, trio, "saga", "cancel", "ctl-1")
    assert again.returncode == 1
    assert again.stderr.strip().startswith("error: ") and "Traceback" not in again.stderr
    missing = await asyncio.to_thread(_ctl, trio, "saga", "get", "no-such-saga")
    assert missing.returncode == 1 and "no saga 'no-such-saga'" in missing.stderr
