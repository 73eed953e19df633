"""One trace per call: client -> entry node -> forwarded owner -> replica.

Nodes trace to JSON-lines files (``--tracing file:DIR``); the test's client
traces in memory. Each span names its parent, so the tree can be checked
across the four processes.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from clients import Mesh
from common.clustermap import read_map
from common.slots import slot_for

SET = "/mesh.cache.v1.CacheService/Set"


def _node_spans(directory: Path, trace_id: str | None) -> list[dict[str, Any]]:
    """The nodes' spans of the trace ``trace_id`` (None: of every trace)."""
    spans = []
    for path in directory.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            span = json.loads(line)
            if trace_id in (None, span["context"]["trace_id"]):
                spans.append(span)
    return spans


async def test_a_forwarded_replicated_write_is_one_trace(local_mesh: Any, tmp_path: Path) -> None:
    spans_dir = tmp_path / "spans"
    local = local_mesh(3, extra=["--tracing", f"file:{spans_dir}"])
    key = "trace:k"
    table = await read_map(local.etcd_endpoint, local.cluster)
    assert table is not None
    group = table.group_of_slot(slot_for(key))
    assert group is not None
    # The entry node holds no copy of the key: it must forward the call.
    (entry,) = [a for n, a in table.addresses.items() if n not in group.members]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = Mesh(addresses=[entry], tracer_provider=provider)
    await mesh.start()
    try:
        await mesh.cache.set(key, b"traced")
    finally:
        await mesh.close()
    (client,) = [s for s in exporter.get_finished_spans()
                 if s.kind == SpanKind.CLIENT and s.name == SET]
    assert client.context is not None
    trace_id = f"0x{client.context.trace_id:032x}"

    def by(name: str, kind: str, parent: str) -> dict[str, Any] | None:
        return next((s for s in spans if s["name"] == name and s["kind"] == kind
                     and s["parent_id"] == parent), None)

    deadline = time.monotonic() + 10  # nodes export every 200 ms
    while True:
        spans = await asyncio.to_thread(_node_spans, spans_dir, trace_id)
        entry_server = by(SET, "SpanKind.SERVER", f"0x{client.context.span_id:016x}")
        forward = entry_server and by(SET, "SpanKind.CLIENT",
                                      entry_server["context"]["span_id"])
        owner = forward and by(SET, "SpanKind.SERVER", forward["context"]["span_id"])
        commit = owner and by("mesh.replicate.commit", "SpanKind.INTERNAL",
                              owner["context"]["span_id"])
        apply = owner and by("mesh.replicate.apply", "SpanKind.INTERNAL",
                             owner["context"]["span_id"])
        if commit and apply:
            break
        assert time.monotonic() < deadline, json.dumps(spans, indent=1)
        await asyncio.sleep(0.2)
    assert entry_server is not None and owner is not None
    services = [s["resource"]["attributes"]["service.name"]
                for s in (entry_server, owner, apply)]
    assert len(set(services)) == 3, services  # entry, owner and replica: three nodes

    # A client that does not trace calls through a session: the node still
    # gives the call a span of its own, the root of the call's trace on the nodes.
    untraced = Mesh(addresses=[entry])
    await untraced.start()
    try:
        await untraced.cache.set(key, b"untraced")
    finally:
        await untraced.close()
    deadline = time.monotonic() + 10
    while True:
        roots = [s for s in await asyncio.to_thread(_node_spans, spans_dir, None)
                 if s["name"] == SET and s["kind"] == "SpanKind.SERVER"
                 and s["parent_id"] is None]
        if roots:
            spans = await asyncio.to_thread(_node_spans, spans_dir,
                                            roots[0]["context"]["trace_id"])
            forward = by(SET, "SpanKind.CLIENT", roots[0]["context"]["span_id"])
            if forward and by(SET, "SpanKind.SERVER", forward["context"]["span_id"]):
                break
        assert time.monotonic() < deadline, json.dumps(roots, indent=1)
        await asyncio.sleep(0.2)
