"""OpenTelemetry set-up: one tracer provider per service, exporting only when configured.

The OTLP exporter is off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; the exporter reads
its other standard OTEL_* variables itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def tracer_provider(
    service_name: str, env: Mapping[str, str], extra_processors: list[SpanProcessor] | None = None
) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    for processor in extra_processors or []:
        provider.add_span_processor(processor)
    return provider
