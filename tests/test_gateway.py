"""The mesh through SGLang's real model gateway: `smg` 1.13.0 from PyPI (its Rust binary runs
on this CPU) in front of two SGLang stand-ins (tests/sglang_standin.py, the test double for a GPU
server). A Solve passes through the gateway, and the cache-aware policy keeps a prompt's warm-up
and its branches on one worker, so the branches reuse the prefix."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import sys

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
import pytest_asyncio
from conftest import service_env
from sglang_standin import FakeSGLang, StandIn

from opentelemetry import trace

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.domain import Budget, CheckSpec, SearchParams, TaskSpec
from rmesh.engine.instant import DEFAULT_TEXT
from rmesh.engine.sglang import SGLangEngine, cache_namespace
from rmesh.mesh.in_process import InProcessVerifier
from rmesh.mesh.serve import start_services
from rmesh.solver_svc.core import SolverCore
from rmesh.solving import SolveRequest
from rmesh.verifier_svc.core import VerifierCore

SMG = pathlib.Path(sys.executable).parent / "smg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest_asyncio.fixture
async def gateway():
    FakeSGLang.reset()
    FakeSGLang.text = DEFAULT_TEXT
    workers = [StandIn().start(), StandIn().start()]
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(SMG), "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware",
        "--worker-urls", *(w.url for w in workers), "--log-level", "warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(120):  # the gateway registers workers after it starts listening
                try:
                    probe = await client.post(f"{url}/generate", json={"text": "ping", "sampling_params": {"max_new_tokens": 0}}, timeout=2)
                    if probe.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)
            else:
                raise AssertionError("the gateway never registered its workers")
        FakeSGLang.reset()
        FakeSGLang.text = DEFAULT_TEXT
        yield url, {w.port: w for w in workers}, process
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
        for worker in workers:
            worker.stop()


async def solve(router: str, problem: str) -> router_pb2.Outcome:
    request = router_pb2.SolveRequest(problem=problem)
    request.task.checks.add(name="arithmetic").params.update({"expression": "2 + 3"})
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        events = [e async for e in stub.Solve(request, metadata=[("authorization", "Bearer demo-key")], timeout=60)]
    return events[-1].outcome


async def test_a_solve_through_the_real_gateway_keeps_each_prompt_on_one_worker(gateway, tmp_path):
    url, workers, _ = gateway
    services = await start_services(("verifier", "solver", "router"), service_env(tmp_path, RMESH_ENGINE="sglang", RMESH_SGLANG_URL=url))
    try:
        router = f"127.0.0.1:{services[-1].port}"
        outcome = await solve(router, "What is 2 + 3?")
        assert outcome.released and outcome.answer == "5"
        # Every /generate the gateway forwarded came with one prompt (no batch lists), in the
        # demo tenant's cache namespace: the gateway passes extra_key through to the worker.
        assert FakeSGLang.requests and all(isinstance(r["text"], str) for r in FakeSGLang.requests)
        assert {r.get("extra_key") for r in FakeSGLang.requests} == {cache_namespace("demo")}
        # The warm-up and the branches of the prompt went to the same worker, so they hit its cache.
        assert len(set(FakeSGLang.workers)) == 1 and FakeSGLang.workers[0] in workers
        assert outcome.usage.cached_tokens > 0
        first = FakeSGLang.workers[0]
        again = await solve(router, "What is 2 + 3?")
        assert again.released and set(FakeSGLang.workers) == {first}
    finally:
        for service in reversed(services):
            await service.stop(0)


async def test_a_worker_down_behind_the_gateway_is_routed_around(gateway, tmp_path):
    url, workers, _ = gateway
    services = await start_services(
        ("verifier", "solver", "router"),
        service_env(tmp_path, RMESH_ENGINE="sglang", RMESH_SGLANG_URL=url, RMESH_ENGINE_HEALTH_SECONDS="0.5"),
    )
    try:
        router = f"127.0.0.1:{services[-1].port}"
        assert (await solve(router, "What is 2 + 3?")).released
        serving = FakeSGLang.workers[0]
        workers[serving].stop()  # the worker holding the prompt's cache goes away
        results = []
        for _ in range(3):
            try:
                results.append((await solve(router, "What is 2 + 3?")).released)
            except grpc.aio.AioRpcError as error:
                results.append(error.code().name + ": " + (error.details() or ""))
        # The gateway sends the prompt to the worker that is left; at worst a request in between
        # fails as UNAVAILABLE naming SGLang, never UNKNOWN or a hang.
        assert results[-1] is True, results
        assert all(r is True or r.startswith("UNAVAILABLE: solver unavailable: UNAVAILABLE: SGLang") for r in results), results
        assert FakeSGLang.workers[-1] != serving
    finally:
        for service in reversed(services):
            await service.stop(0)


async def test_a_beam_search_continues_nodes_by_token_ids_through_the_gateway(gateway):
    """Step strategies continue each node from its parent's generated ids (input_ids), and the
    gateway passes them through to the worker holding the prefix."""
    url, workers, _ = gateway
    FakeSGLang.text = "<checkpoint>2 + 3 = 5</checkpoint>\n"  # one step per call: nodes stay open
    engine = SGLangEngine(url)
    assert await engine.describe()  # the gateway answers /v1/models: the template follows the model
    core = SolverCore(engine, InProcessVerifier(VerifierCore(), trace.get_tracer("test")))
    request = SolveRequest(
        problem="What is 2 + 3?", task=TaskSpec("arithmetic", (CheckSpec("arithmetic", {"expression": "7"}),)),
        strategy="beam", budget=Budget(3000, 12, 3, 60, 60), search=SearchParams(beam_width=2, branching_factor=2),
        tenant="acme",  # one namespace for every round, as the router gives a tenant's requests
    )
    result = await core.solve(request, _no_progress)
    await engine.aclose()
    by_ids = [w for r, w in zip(FakeSGLang.requests, FakeSGLang.workers, strict=True) if "input_ids" in r]
    continued = [r for r in FakeSGLang.requests if "input_ids" in r and r["sampling_params"].get("max_new_tokens")]
    assert result.candidates_evaluated > 2 and continued
    # Token-id requests keep their affinity too: all of them reached the worker whose cache holds
    # the prefix, so each continuation reused its parent's tokens.
    assert len(set(by_ids)) == 1
    assert result.usage.cached_tokens > 0


async def _no_progress(_progress) -> None:
    return None


async def test_the_gateway_down_is_unavailable_and_the_solver_stops_serving(gateway, tmp_path):
    url, _, process = gateway
    services = await start_services(
        ("verifier", "solver", "router"),
        service_env(tmp_path, RMESH_ENGINE="sglang", RMESH_SGLANG_URL=url, RMESH_ENGINE_HEALTH_SECONDS="0.3"),
    )
    solver = next(s for s in services if s.name == "solver")
    try:
        router = f"127.0.0.1:{services[-1].port}"
        assert (await solve(router, "What is 2 + 3?")).released
        process.terminate()
        await process.wait()
        try:
            await solve(router, "What is 2 + 3?")
            raise AssertionError("released without an engine")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details().startswith("solver unavailable: UNAVAILABLE: SGLang engine at")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{solver.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(50):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        for service in reversed(services):
            await service.stop(0)
