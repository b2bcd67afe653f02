"""With all three services in one process (RMESH_COLOCATED_CALLS unset: the default), the router
and the solver call their peers' cores directly. Same outcomes, one trace, deadlines still hold, and the
internal gRPC hops are gone."""

from __future__ import annotations

import pathlib
import time

import grpc
import pytest
import pytest_asyncio
from conftest import service_env
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.engine.instant import InstantEngine
from rmesh.mesh.serve import start_services

ROOT = pathlib.Path(__file__).resolve().parent.parent
AUTH = [("authorization", "Bearer demo-key")]


@pytest_asyncio.fixture
async def colocated(tmp_path):
    spans = InMemorySpanExporter()
    env = service_env(tmp_path)
    del env["RMESH_COLOCATED_CALLS"]  # what `rmesh serve` does when nothing says otherwise
    engine = InstantEngine(delay_seconds=0.3)
    services = await start_services(("verifier", "solver", "router"), env, engine=engine, extra_processors=[SimpleSpanProcessor(spans)])
    router = next(s for s in services if s.name == "router")
    yield f"127.0.0.1:{router.port}", spans, engine
    for service in reversed(services):
        await service.stop(0)


def arithmetic(expression: str = "2 + 3") -> router_pb2.SolveRequest:
    request = router_pb2.SolveRequest(problem=f"What is {expression}?")
    request.task.kind = "colocated"
    request.task.checks.add(name="arithmetic").params.update({"expression": expression})
    return request


async def solve(router: str, request, timeout: float = 30) -> list:
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return [e async for e in stub.Solve(request, metadata=AUTH, timeout=timeout)]


async def test_outcomes_match_and_one_trace_holds_every_service_without_internal_grpc(colocated):
    router, spans, _ = colocated
    assert (await solve(router, arithmetic()))[-1].outcome.released
    refused = (await solve(router, arithmetic("2 + 4")))[-1].outcome
    assert not refused.released and refused.kind == router_pb2.OUTCOME_KIND_NO_ELIGIBLE_ANSWER
    finished = spans.get_finished_spans()
    root = next(s for s in finished if s.name.endswith("RouterService/Solve") and s.parent is None)
    in_trace = [s for s in finished if s.context.trace_id == root.context.trace_id]
    services = {s.resource.attributes["service.name"] for s in in_trace}
    assert services == {"rmesh-router", "rmesh-solver", "rmesh-verifier"}
    names = [s.name for s in in_trace]
    assert "rmesh.api.solver.v1.SolverService/Solve (in process)" in names
    assert "rmesh.api.verifier.v1.VerifierService/Verify (in process)" in names
    assert any(n.startswith("branch ") for n in names)
    # No internal call went over gRPC: the only server span is the router's.
    assert [s.name for s in in_trace if s.kind.name == "SERVER"] == [root.name]


async def test_the_callers_deadline_reaches_the_engine(colocated):
    router, _, engine = colocated
    seen: list[float | None] = []
    original = engine.generate_many

    async def recording(requests):
        seen.extend(r.deadline for r in requests)
        return await original(requests)

    engine.generate_many = recording
    try:
        started = time.monotonic()
        assert (await solve(router, arithmetic(), timeout=10))[-1].outcome.released
    finally:
        engine.generate_many = original
    assert seen and all(d is not None and started + 8 < d <= started + 10.5 for d in seen)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await solve(router, arithmetic(), timeout=0.15)  # shorter than the engine's 0.3 s
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_bad_input_gets_the_same_status_as_over_grpc(colocated):
    router, _, _ = colocated
    request = router_pb2.SolveRequest(problem="What is 2 + 3?")
    request.task.checks.add(name="chess")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await solve(router, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("task.checks[0].name: unknown checker 'chess'")


async def test_a_peer_failing_looks_the_same_as_over_grpc(colocated):
    """An engine failure inside the in-process solver reaches the caller as it would from a
    separate solver process: UNAVAILABLE, prefixed with the service it came from."""
    router, _, engine = colocated
    broken = RuntimeError("the engine lost its GPU")

    async def fail(_requests):
        raise broken

    original, engine.generate_many = engine.generate_many, fail
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await solve(router, arithmetic())
    finally:
        engine.generate_many = original
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "solver unavailable: INTERNAL: internal error: RuntimeError"
