"""Traces reach a real OTLP collector: rotel (PyPI `rotel`) on loopback receives the mesh's
spans and forwards them over OTLP/gRPC to a sink this test runs, where they are inspected."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import subprocess

import grpc
import pytest
import rotel
from conftest import service_env
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.mesh.serve import start_services

AGENT = pathlib.Path(rotel.__file__).parent / "rotel-agent"


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, object]]:
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope in resource_spans.scope_spans:
                    found += [(service, span) for span in scope.spans]
        return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = value.string_value or value.int_value or value.double_value or value.bool_value
    return out


@pytest.mark.timeout(300)
async def test_one_solve_arrives_as_one_trace_with_every_service_and_branch(engine, tmp_path):
    sink = Sink()
    sink_server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, sink_server)
    sink_port = sink_server.add_insecure_port("127.0.0.1:0")
    await sink_server.start()
    collector_port, collector_http = _free_port(), _free_port()
    collector = subprocess.Popen(
        [
            str(AGENT), "start",
            "--otlp-grpc-endpoint", f"127.0.0.1:{collector_port}",
            "--otlp-http-endpoint", f"127.0.0.1:{collector_http}",
            "--exporter", "otlp",
            "--otlp-exporter-endpoint", f"http://127.0.0.1:{sink_port}",
            "--otlp-exporter-protocol", "grpc",
            "--traces-batch-timeout", "200ms",
        ],
        stdout=open(tmp_path / "rotel.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    services = []
    try:
        # service_env keeps gRPC between the services: the trace context must cross real hops.
        env = service_env(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}")
        await asyncio.sleep(0.5)  # the collector binds its port
        services = await start_services(("verifier", "solver", "router"), env, engine=engine)
        router = next(s for s in services if s.name == "router")
        request = router_pb2.SolveRequest(problem="What is 9 + 8 + 2?")
        request.task.kind = "tracing"
        request.task.checks.add(name="arithmetic").params.update({"expression": "9 + 8 + 2"})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            events = [e async for e in stub.Solve(request, metadata=[("authorization", "Bearer demo-key")], timeout=240)]
        assert events[-1].WhichOneof("event") == "outcome"
        for _ in range(100):
            # The router's server span ends just after the stream does: flush until it arrives.
            for service in services:
                service.provider.force_flush()
            if any(span.name.endswith("RouterService/Solve") for _, span in sink.spans()):
                break
            await asyncio.sleep(0.1)
        spans = sink.spans()
        router_spans = [span for service, span in spans if service == "rmesh-router" and span.name.endswith("RouterService/Solve")]
        assert len(router_spans) == 1
        trace_id = router_spans[0].trace_id
        in_trace = [(service, span) for service, span in spans if span.trace_id == trace_id]
        assert {service for service, _ in in_trace} == {"rmesh-router", "rmesh-solver", "rmesh-verifier"}
        branches = [attributes(span) for _, span in in_trace if span.name.startswith("branch ")]
        assert len(branches) >= 2
        for attrs in branches:
            assert attrs["gen_ai.operation.name"] == "text_completion"
            assert "gemma" in attrs["gen_ai.request.model"]
            assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
            assert {"rmesh.branch.id", "rmesh.branch.parent", "rmesh.branch.cached_tokens"} <= set(attrs)
    finally:
        for service in reversed(services):
            await service.stop(1)
        collector.terminate()
        collector.wait(timeout=10)
        await sink_server.stop(0)
