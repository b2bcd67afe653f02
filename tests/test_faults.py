"""Faults: what a caller sees when the engine, the verifier, the solver or the router fails, and
that the mesh recovers. The engine faults use the SGLang stand-in (tests/sglang_standin.py, a
test double: no GPU here); everything else is the real services on real ports."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import pytest
import pytest_asyncio
from conftest import SERVICE_TOKEN, service_env
from sglang_standin import FakeSGLang, StandIn

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.api.verifier.v1 import verifier_pb2
from rmesh.peers import VERIFIER_SERVICE, SolverClient, VerifierClient, wait_serving
from rmesh.config import ServerSettings
from rmesh.domain import CheckSpec, TaskSpec
from rmesh.router_svc.core import RouterRequest
from rmesh.router_svc.core import Status as RouterStatus
from rmesh.solving import Progress
from rmesh.engine.instant import DEFAULT_TEXT, InstantEngine
from rmesh.errors import Unavailable
from rmesh.grpc_edge import create_channel
from rmesh.mesh.serve import start_services

ROOT = pathlib.Path(__file__).resolve().parent.parent
AUTH = [("authorization", "Bearer demo-key")]
RMESH = str(pathlib.Path(sys.executable).parent / "rmesh")


def arithmetic() -> router_pb2.SolveRequest:
    request = router_pb2.SolveRequest(problem="What is 2 + 3?")
    request.task.kind = "faults"
    request.task.checks.add(name="arithmetic").params.update({"expression": "2 + 3"})
    return request


async def solve(address: str, request=None, timeout: float = 30, metadata=AUTH) -> list:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return [e async for e in stub.Solve(request or arithmetic(), metadata=metadata, timeout=timeout)]


async def status_of(address: str, **kwargs) -> tuple[grpc.aio.AioRpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await solve(address, **kwargs)
    return info.value, time.monotonic() - started


# -- the engine (SGLang path) ----------------------------------------------------------------------


@dataclass
class SGLangMesh:
    standin: StandIn
    router: str
    solver: str
    services: list


@pytest_asyncio.fixture
async def sglang_mesh(tmp_path):
    FakeSGLang.reset()
    FakeSGLang.text = DEFAULT_TEXT
    standin = StandIn().start()
    services = await start_services(
        ("verifier", "solver", "router"),
        service_env(tmp_path, RMESH_ENGINE="sglang", RMESH_SGLANG_URL=standin.url, RMESH_ENGINE_HEALTH_SECONDS="0.3"),
    )
    router = next(s for s in services if s.name == "router")
    solver = next(s for s in services if s.name == "solver")
    yield SGLangMesh(standin, f"127.0.0.1:{router.port}", f"127.0.0.1:{solver.port}", services)
    for service in reversed(services):
        await service.stop(0)
    standin.stop()


async def test_engine_answering_normally_releases(sglang_mesh):
    router = sglang_mesh.router
    outcome = (await solve(router))[-1].outcome
    assert outcome.released and outcome.answer == "5"


async def test_the_solver_admits_against_the_engines_real_kv_pool_and_load(sglang_mesh):
    """Not a made-up budget: the stand-in's /server_info reports a pool of 500 000 tokens, and
    /get_load what its other clients hold."""
    service = next(s for s in sglang_mesh.services if s.name == "solver")
    engine = service.core.engine
    assert engine.model_name == "google/gemma-3-270m-it"
    assert service.core.kv_ledger.capacity == 500_000 * engine.kv_bytes_per_token
    # Other clients of the same server fill most of its pool: this solver admits against what is left.
    FakeSGLang.load_tokens = 499_000
    for _ in range(50):
        if service.core.kv_ledger.external:
            break
        await asyncio.sleep(0.1)
    assert service.core.kv_ledger.external == 499_000 * engine.kv_bytes_per_token
    error, _ = await status_of(sglang_mesh.router)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "held by the engine's other clients" in error.details()
    FakeSGLang.load_tokens = 0
    for _ in range(50):
        if not service.core.kv_ledger.external:
            break
        await asyncio.sleep(0.1)
    assert (await solve(sglang_mesh.router))[-1].outcome.released


async def test_engine_dying_mid_search_is_unavailable_promptly_and_the_solver_recovers(sglang_mesh):
    standin, router = sglang_mesh.standin, sglang_mesh.router
    FakeSGLang.drop = True  # the process goes away with the request on the wire
    error, took = await status_of(router)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith("solver unavailable: UNAVAILABLE: SGLang")
    assert took < 10
    standin.stop()
    error, took = await status_of(router)  # nothing listens on the port now
    assert error.code() == grpc.StatusCode.UNAVAILABLE and took < 10
    FakeSGLang.drop = False
    standin.start()  # the engine returns on the same port
    outcome = (await solve(router))[-1].outcome
    assert outcome.released and outcome.answer == "5"


async def test_the_solvers_health_follows_its_engine(sglang_mesh):
    standin, router, solver = sglang_mesh.standin, sglang_mesh.router, sglang_mesh.solver

    async def status() -> int:
        async with grpc.aio.insecure_channel(solver) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status

    assert await status() == health_pb2.HealthCheckResponse.SERVING
    standin.stop()
    for _ in range(50):
        if await status() == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.2)
    assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    standin.start()
    for _ in range(50):
        if await status() == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.2)
    assert await status() == health_pb2.HealthCheckResponse.SERVING
    assert (await solve(router))[-1].outcome.released


async def test_engine_slower_than_the_deadline_is_deadline_exceeded_promptly(sglang_mesh):
    router = sglang_mesh.router
    FakeSGLang.delay = 8
    error, took = await status_of(router, timeout=1.5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 4


@pytest.mark.parametrize("status", [400, 422, 500])
async def test_engine_refusing_the_request_is_unavailable_naming_sglang_and_its_message(sglang_mesh, status):
    FakeSGLang.fail_status = status
    error, took = await status_of(sglang_mesh.router)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and took < 10
    assert f"SGLang /generate answered {status}" in error.details() and f"refused with {status}" in error.details()
    FakeSGLang.fail_status = 0
    assert (await solve(sglang_mesh.router))[-1].outcome.released


async def test_engine_returning_malformed_json_is_unavailable(sglang_mesh):
    router = sglang_mesh.router
    FakeSGLang.malformed = True
    error, took = await status_of(router)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "malformed JSON" in error.details()
    FakeSGLang.malformed = False
    assert (await solve(router))[-1].outcome.released


async def test_a_solver_waits_for_its_engine_to_say_which_model_it_serves(tmp_path):
    """Started before SGLang: alive but not ready; ready once SGLang answers and names a model of
    a known family; not ready again, saying why, when the model has no known template."""
    FakeSGLang.reset()
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    standin = StandIn(port.getsockname()[1])
    port.close()
    services = await start_services(
        ("verifier", "solver"),
        service_env(tmp_path, RMESH_ENGINE="sglang", RMESH_SGLANG_URL=standin.url, RMESH_ENGINE_HEALTH_SECONDS="0.3"),
    )
    solver = next(s for s in services if s.name == "solver")

    async def status(service: str = "") -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{solver.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status

    async def becomes(wanted: int) -> int:
        for _ in range(60):
            if await status() == wanted:
                break
            await asyncio.sleep(0.2)
        return await status()

    try:
        assert await becomes(health_pb2.HealthCheckResponse.NOT_SERVING) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("rmesh.live") == health_pb2.HealthCheckResponse.SERVING  # alive: no restart
        standin.start()
        assert await becomes(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING
        engine = solver.core.engine
        assert engine.model_name == "google/gemma-3-270m-it" and engine.chat_template.name == "gemma"
        FakeSGLang.model = "meta-llama/Llama-3.1-8B-Instruct"
        standin.stop()
        assert await becomes(health_pb2.HealthCheckResponse.NOT_SERVING) == health_pb2.HealthCheckResponse.NOT_SERVING
        standin.start()
        await asyncio.sleep(1.5)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert engine.readiness_problem().startswith(
            "the served model meta-llama/Llama-3.1-8B-Instruct is of no family with a shipped chat template"
        )
        # A known model whose server does not say what a token of KV costs: still not ready.
        FakeSGLang.model, FakeSGLang.report_memory = "google/gemma-3-270m-it", False
        await asyncio.sleep(1.5)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "has not reported its KV cache size" in engine.readiness_problem()
        FakeSGLang.report_memory = True
        assert await becomes(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING
    finally:
        for service in reversed(services):
            await service.stop(0)
        standin.stop()


# -- the verifier and the solver ----------------------------------------------------------------------


@pytest_asyncio.fixture
async def instant_mesh(tmp_path):
    services = await start_services(("verifier", "solver", "router"), service_env(tmp_path), engine=InstantEngine())
    yield {s.name: s for s in services}
    for service in reversed(services):
        await service.stop(0)


async def test_verifier_down_releases_nothing_and_says_why(instant_mesh):
    router = f"127.0.0.1:{instant_mesh['router'].port}"
    assert (await solve(router))[-1].outcome.released
    await instant_mesh["verifier"].stop(0)
    error, took = await status_of(router)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "verifier" in error.details()
    assert took < 10


async def test_solver_down_router_answers_unavailable_within_its_timeout(instant_mesh):
    router = f"127.0.0.1:{instant_mesh['router'].port}"
    await instant_mesh["solver"].stop(0)
    error, took = await status_of(router, timeout=20)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "solver" in error.details()
    assert took < 10


class CountingServer:
    """A gRPC server that answers every call UNAVAILABLE a set number of times, then as
    ``answer`` says, counting the attempts that reached it."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[str, int] = {}

    def handler(self, name: str, streaming: bool):
        async def unary(request: bytes, context):
            self.attempts[name] = self.attempts.get(name, 0) + 1
            if self.attempts[name] <= self.failures:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            return verifier_pb2.PrecheckResponse(numeric_answer=True).SerializeToString()

        async def stream(request: bytes, context):
            self.attempts[name] = self.attempts.get(name, 0) + 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            yield b""

        return grpc.unary_stream_rpc_method_handler(stream) if streaming else grpc.unary_unary_rpc_method_handler(unary)

    async def start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(VERIFIER_SERVICE, {"Precheck": self.handler("Precheck", False)}),
            grpc.method_handlers_generic_handler("rmesh.api.solver.v1.SolverService", {"Solve": self.handler("Solve", True)}),
        ))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port


async def test_retry_policy_retries_the_verifier_and_never_a_solve():
    fake = CountingServer(failures=2)
    server, port = await fake.start()
    settings = ServerSettings()
    verifier_channel = create_channel(f"127.0.0.1:{port}", settings, [VERIFIER_SERVICE])
    solver_channel = create_channel(f"127.0.0.1:{port}", settings)
    try:
        precheck = await VerifierClient(verifier_channel).precheck(TaskSpec("t", ()), {}, ())
        assert precheck.numeric_answer  # the third attempt answered
        assert fake.attempts["Precheck"] == 3
        from rmesh.solving import SolveRequest

        with pytest.raises(Unavailable):
            async for _ in SolverClient(solver_channel).solve(SolveRequest(problem="p", task=TaskSpec("t", ()))):
                pass
        assert fake.attempts["Solve"] == 1  # a search is not repeated behind the caller's back
    finally:
        await verifier_channel.close()
        await solver_channel.close()
        await server.stop(0)


# -- the whole mesh as a process: SIGTERM under load, SIGKILL with budget held ------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _spawn(env: dict) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        RMESH, "serve", cwd=ROOT, env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )


def _process_env(tmp: pathlib.Path, **extra: str) -> dict:
    return {
        "RMESH_ROUTER_ADDR": f"127.0.0.1:{_free_port()}",
        "RMESH_SOLVER_ADDR": f"127.0.0.1:{_free_port()}",
        "RMESH_VERIFIER_ADDR": f"127.0.0.1:{_free_port()}",
        "RMESH_TENANTS_DIR": str(ROOT / "policy" / "tenants"),
        "RMESH_REVIEW_DB": str(tmp / "reviews.sqlite3"),
        "RMESH_ENGINE": "instant",
        "RMESH_SERVICE_TOKEN": SERVICE_TOKEN,
        **extra,
    }


async def _outcome_or_status(address: str, timeout: float = 30) -> str:
    try:
        events = await solve(address, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return router_pb2.OutcomeKind.Name(events[-1].outcome.kind)


@pytest.mark.timeout(120)
async def test_sigterm_under_load_finishes_in_flight_streams_and_refuses_new_ones(tmp_path):
    env = _process_env(tmp_path, RMESH_INSTANT_DELAY_SECONDS="4", RMESH_GRACE_SECONDS="15")
    router = env["RMESH_ROUTER_ADDR"]
    process = await _spawn(env)
    try:
        await wait_serving(router, 60)
        in_flight = [asyncio.create_task(_outcome_or_status(router)) for _ in range(6)]
        await asyncio.sleep(1.5)  # every stream is inside the engine's 4 s think time
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        late = await _outcome_or_status(router, timeout=5)
        results = await asyncio.gather(*in_flight)
        started = time.monotonic()
        code = await asyncio.wait_for(process.wait(), timeout=20)
    finally:
        if process.returncode is None:
            process.kill()
    assert results == ["OUTCOME_KIND_RELEASED"] * 6  # in flight when the signal came: finished
    assert late == "UNAVAILABLE"  # new work is refused once draining starts
    assert code == 0 and time.monotonic() - started < 20


@pytest.mark.timeout(120)
async def test_router_killed_with_reviews_pending_and_budget_held_loses_and_leaks_nothing(tmp_path):
    env = _process_env(tmp_path, RMESH_INSTANT_DELAY_SECONDS="8")
    router = env["RMESH_ROUTER_ADDR"]
    process = await _spawn(env)
    try:
        await wait_serving(router, 60)
        escalated = await solve(router, router_pb2.SolveRequest(problem="Approve this refund?", high_impact=True))
        review_id = escalated[-1].outcome.review_id
        assert review_id
        # demo allows 8 concurrent requests: hold all eight, then kill the router mid-flight.
        held = [asyncio.create_task(_outcome_or_status(router)) for _ in range(8)]
        await asyncio.sleep(2.0)  # all eight admitted and inside the engine's 8 s think time
        assert await _outcome_or_status(router, timeout=5) == "RESOURCE_EXHAUSTED"
        process.kill()
        assert set(await asyncio.gather(*held)) == {"UNAVAILABLE"}
        await process.wait()
        process = await _spawn({**env, "RMESH_INSTANT_DELAY_SECONDS": "0.5"})
        await wait_serving(router, 60)
        # Reservations lived in the dead process: the tenant has its whole capacity again.
        again = await asyncio.gather(*(_outcome_or_status(router) for _ in range(8)))
        assert again == ["OUTCOME_KIND_RELEASED"] * 8
        from rmesh.api.review.v1 import review_pb2, review_pb2_grpc

        async with grpc.aio.insecure_channel(router) as channel:
            reply = await review_pb2_grpc.ReviewServiceStub(channel).GetReview(
                review_pb2.GetReviewRequest(id=review_id), metadata=[("authorization", "Bearer demo-reviewer-key")], timeout=10
            )
        assert reply.review.state == review_pb2.REVIEW_STATE_PENDING
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


# -- honest quota ---------------------------------------------------------------------------------


async def test_every_ending_charges_what_the_request_used_not_its_reservation(tmp_path):
    """Success, deadline, cancel and a solver outage each charge the tokens really generated, and
    a branch cut off mid-decoding at its token cap; never the request's whole reservation (the
    demo arithmetic route reserves 1200 tokens, 150 per branch, and starts with one greedy branch)."""
    services = await start_services(
        ("verifier", "solver", "router"), service_env(tmp_path), engine=InstantEngine(delay_seconds=1.0)
    )
    named = {s.name: s for s in services}
    router = f"127.0.0.1:{named['router'].port}"
    ledger = named["router"].core.admission.ledger("demo")
    try:
        outcome = (await solve(router))[-1].outcome
        assert outcome.released and 0 < outcome.usage.completion_tokens < 150
        assert ledger.used(time.monotonic(), 60) == outcome.usage.completion_tokens
        charged = ledger.used(time.monotonic(), 60)

        error, _ = await status_of(router, timeout=0.5)  # ends inside the engine's 1 s think time
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.6)
        assert ledger.reserved == 0 and ledger.active == 0
        charged += 150  # the greedy branch was decoding: its cap, not the 1200 reserved
        assert ledger.used(time.monotonic(), 60) == charged

        async with grpc.aio.insecure_channel(router) as channel:
            call = router_pb2_grpc.RouterServiceStub(channel).Solve(arithmetic(), metadata=AUTH, timeout=30)
            await call.read()  # accepted
            await asyncio.sleep(0.3)
            call.cancel()
        await asyncio.sleep(0.5)
        assert ledger.reserved == 0 and ledger.active == 0
        charged += 150
        assert ledger.used(time.monotonic(), 60) == charged

        await named["solver"].stop(0)
        error, _ = await status_of(router, timeout=20)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert ledger.reserved == 0 and ledger.used(time.monotonic(), 60) == charged  # nothing ran
    finally:
        for service in reversed(services):
            await service.stop(0)


async def test_a_caller_that_stops_reading_is_still_charged_for_the_search_that_ran(tmp_path):
    """The router reads the solver's events as they come, whatever pace its caller reads at: a
    caller that takes the first events, then stalls and cancels, is charged every token the
    search reported meanwhile, not only what it had read."""
    services = await start_services(
        ("verifier", "solver", "router"), service_env(tmp_path, RMESH_COLOCATED_CALLS="1"),
        engine=InstantEngine(delay_seconds=0.3),
    )
    router = services[-1]
    ledger = router.core.admission.ledger("demo")
    try:
        policy = router.policies.snapshot.policies["demo"]
        task = TaskSpec("stall", (CheckSpec("arithmetic", {"expression": "7"}),))  # the engine answers 5: never passes
        events = router.core.solve(policy, RouterRequest(problem="What is 3 + 4?", task=task), "demo-caller")
        assert isinstance(await events.__anext__(), RouterStatus)
        while not isinstance(await events.__anext__(), Progress):
            pass  # up to the search's first progress event: the search is running
        await asyncio.sleep(4.0)  # the caller reads nothing more while the ladder runs its rungs
        await events.aclose()
        charged = ledger.used(time.monotonic(), 60)
        # Best-of-8 (greedy, then 7 samples) and beam rounds ran: far more than one branch's cap.
        assert charged > 2 * 150, charged
    finally:
        for service in reversed(services):
            await service.stop(0)
