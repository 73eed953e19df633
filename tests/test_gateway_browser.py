"""A real browser on the gateway's live page (``/live``), through SIGKILLs.

Headless Chromium (Debian's ``chromium``, installed by ``make setup``, driven by
Playwright) opens the page the gateway serves, logs in with a token and
subscribes over one WebSocket to a notification channel and an event stream.
Python publishes and appends; the primary of the channel is SIGKILLed (the
gateway resumes the node's streams), then the gateway itself is SIGKILLed
and started again on the same port (the page reconnects with its cursors).
The page's DOM must show every message exactly once, in order; a screenshot
is left in the test's directory.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright

from clients import Mesh, NewEvent
from common.localmesh import Etcd, GatewayProcess, LocalMesh, NodeProcess
from tests.cluster import TOKEN, auth_flags
from tests.conftest import module_cluster, non_owner

CHANNEL, STREAM = "browser.news", "browser-orders"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def cluster(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Three nodes (R = 1, 2 s leases) that require tokens."""
    yield from module_cluster(etcd, tmp_path_factory, "gwbrowser", 3, auth_flags, lease_ttl=2)


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


def _owner(cluster: LocalMesh, key: str) -> NodeProcess:
    others = set(non_owner(cluster, key))
    [owner] = [n for n in cluster.nodes if n.address not in others]
    return owner


async def _shown(page: Page, count: int) -> tuple[list[str], list[str]]:
    """Wait until the page lists ``count`` publications and events; their texts."""
    await page.wait_for_function(
        "n => document.querySelectorAll('#publications li').length >= n"
        " && document.querySelectorAll('#events li').length >= n", arg=count, timeout=60_000)
    publications = await page.locator("#publications li").all_inner_texts()
    events = await page.locator("#events li").all_inner_texts()
    return publications, events


async def _send(mesh: Mesh, numbers: range) -> None:
    for i in numbers:
        await mesh.notify.publish(CHANNEL, f"news {i}", timeout=30)
        await mesh.events.append(STREAM, NewEvent("OrderPlaced", f"order {i}".encode()),
                                 timeout=30)


async def test_the_live_page_shows_every_message_once_across_node_and_gateway_kills(
    cluster: LocalMesh, page: Page, tmp_path: Path
) -> None:
    gateway: GatewayProcess = cluster.start_gateway(["--ws-heartbeat", "2"])
    await page.goto(f"{gateway.url}/live?token={TOKEN}&channel={CHANNEL}&stream={STREAM}"
                    "&autoconnect=1")
    await page.wait_for_function("document.body.dataset.channelLive === '1'", timeout=30_000)
    async with Mesh(etcd=cluster.etcd_endpoint, cluster=cluster.cluster, token=TOKEN) as mesh:
        await _send(mesh, range(0, 10))
        await _shown(page, 10)
        # The channel's primary dies: the gateway resumes both streams elsewhere.
        _owner(cluster, CHANNEL).child.kill()
        await _send(mesh, range(10, 20))
        await _shown(page, 20)
        # The gateway dies: the page reconnects to its successor with its cursors.
        port = gateway.address.rsplit(":", 1)[1]
        gateway.child.kill()
        await page.wait_for_function(
            "document.getElementById('status').textContent !== 'connected'", timeout=30_000)
        await _send(mesh, range(20, 30))
        cluster.start_gateway(["--ws-heartbeat", "2", "--listen", f"127.0.0.1:{port}"])
        publications, events = await _shown(page, 30)
    await page.screenshot(path=str(tmp_path / "live.png"), full_page=True)
    assert publications == [f"news {i}" for i in range(30)]
    assert events == [f"OrderPlaced order {i}" for i in range(30)]
    assert await page.locator("#connects").inner_text() == "2"
    assert (tmp_path / "live.png").stat().st_size > 0
