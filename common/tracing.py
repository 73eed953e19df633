"""OpenTelemetry tracing for nodes and coordinators (``--tracing``), off by default.

``--tracing`` takes ``off``, ``console``, ``otlp`` (the exporter's usual
``OTEL_EXPORTER_OTLP_*`` settings apply) or ``file:DIR`` (one JSON span per line
in ``DIR/<pid>.jsonl``; what the tests read). gRPC calls are traced by
opentelemetry-instrumentation-grpc's interceptors, on the server and on the
channels a node uses to forward, so a forwarded call stays in its trace.
Replication is one long stream shared by many requests, so a command carries
its request's W3C ``traceparent`` instead, and a replica applies it in a span
of that trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.trace import Tracer

# The SDK and the gRPC instrumentation are imported only when tracing is on:
# they add a noticeable share to every process's start-up.

__all__ = ["Tracing", "enabled", "traceparent"]

_tracer: Tracer | None = None
"""Set while this process traces: the hot paths check it and do nothing otherwise."""


def enabled() -> bool:
    return _tracer is not None


class JsonLinesExporter(SpanExporter):
    """Each span as one JSON line in ``directory/<pid>.jsonl`` (from the export thread)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / f"{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(span.to_json())) + "\n" for span in spans)
        with self._lock, self._path.open("a") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS


class Tracing:
    """This process's tracer provider, when tracing is on."""

    def __init__(self, spec: str, service_name: str) -> None:
        global _tracer
        self.provider: TracerProvider | None = None
        if spec in ("", "off"):
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        exporter: SpanExporter
        if spec == "console":
            exporter = ConsoleSpanExporter()
        elif spec == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter()
        elif spec.startswith("file:"):
            exporter = JsonLinesExporter(Path(spec.removeprefix("file:")))
        else:
            raise ValueError(f"--tracing: expected off, console, otlp or file:DIR, not {spec!r}")
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        # Spans are exported from the processor's thread, never on the event loop.
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
        _tracer = self.provider.get_tracer("mesh")

    def server_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        return [aio_server_interceptor(tracer_provider=self.provider)]  # type: ignore[no-untyped-call]

    def client_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
        return list(aio_client_interceptors(tracer_provider=self.provider))  # type: ignore[no-untyped-call]

    def shutdown(self) -> None:
        """Flush and stop (blocks while the last spans are exported)."""
        global _tracer
        if self.provider is not None:
            self.provider.shutdown()
            _tracer = None


def traceparent() -> str:
    """The current span's W3C traceparent ("" when not tracing or outside a span)."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


@contextlib.contextmanager
def span(name: str, parent: str = "", server: bool = False,
         **attributes: str | int) -> Iterator[None]:
    """A span named ``name`` (a child of ``parent``, a traceparent, if given; of the
    server kind if ``server``, as a call's span); nothing when this process does not
    trace."""
    if _tracer is None:
        yield
        return
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind

    context = propagate.extract({"traceparent": parent}) if parent else None
    if server and context is None:  # a call's root span, not the current one's child
        context = Context()
    kind = SpanKind.SERVER if server else SpanKind.INTERNAL
    with _tracer.start_as_current_span(name, context=context, kind=kind,
                                       attributes=attributes):
        yield
