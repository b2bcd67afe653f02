"""OpenTelemetry set-up: one tracer provider per service, exporting only when configured.

The OTLP/gRPC exporter is off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (``http://`` for a
plaintext collector); the exporter reads its other standard OTEL_* variables itself.
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
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    for processor in extra_processors or []:
        provider.add_span_processor(processor)
    return provider
