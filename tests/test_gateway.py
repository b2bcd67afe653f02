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
import pytest_asyncio
from conftest import service_env
from sglang_standin import FakeSGLang, StandIn

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.engine.instant import DEFAULT_TEXT
from rmesh.mesh.serve import start_services

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
        yield url, {w.port: w for w in workers}
    finally:
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
    url, workers = gateway
    services = await start_services(("verifier", "solver", "router"), service_env(tmp_path, RMESH_ENGINE="sglang", RMESH_SGLANG_URL=url))
    try:
        router = f"127.0.0.1:{services[-1].port}"
        outcome = await solve(router, "What is 2 + 3?")
        assert outcome.released and outcome.answer == "5"
        # Every /generate the gateway forwarded came with one prompt (no batch lists).
        assert FakeSGLang.requests and all(isinstance(r["text"], str) for r in FakeSGLang.requests)
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
    url, workers = gateway
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
