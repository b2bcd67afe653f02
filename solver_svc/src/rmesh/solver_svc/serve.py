"""The solver service: search over candidates on an engine, checked by the verifier."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from opentelemetry.sdk.trace import TracerProvider

from rmesh import grpc_edge, peers
from rmesh.config import Addresses, ServerSettings, SolverConfig
from rmesh.engine import Engine, create_engine
from rmesh.errors import Unavailable
from rmesh.serving import RunningService, provider_factory, start_server
from rmesh.solver_svc import servicer as solver_servicer
from rmesh.solver_svc.core import SolverCore
from rmesh.solver_svc.kv_budget import KVLedger
from rmesh.solving import VerifierPort

log = logging.getLogger("rmesh.solver")
# How long one engine health check may take (SGLang's /health sleeps 1 s before it answers).
ENGINE_HEALTH_TIMEOUT_SECONDS = 10.0


async def start_solver(
    address: str,
    settings: ServerSettings,
    provider: TracerProvider,
    verifier_address: str,
    engine: Engine,
    own_engine: bool = True,
    answer_style: str = "extractive",
    kv_budget_bytes: int = 0,
    kv_wait_seconds: float = 5.0,
    verifier: VerifierPort | None = None,
    code_verifier_address: str = "",
    engine_health_seconds: float = 5.0,
) -> RunningService:
    """The solver service; ``verifier`` replaces the gRPC client (an in-process port);
    ``code_verifier_address`` names a separate verifier for tasks with code checks."""
    client, channels = peers.verifier_port(verifier_address, code_verifier_address, settings, provider)
    # Default budget: what the engine's own context can hold (the embedded engine), else 8 GiB.
    n_ctx = getattr(engine, "n_ctx", 0)
    capacity = kv_budget_bytes or (n_ctx * engine.kv_bytes_per_token if n_ctx else 8 << 30)
    core = SolverCore(
        engine,
        verifier or client,
        tracer=provider.get_tracer("rmesh.solver"),
        answer_style=answer_style,
        kv_ledger=KVLedger(capacity, kv_wait_seconds),
    )
    servicer = solver_servicer.SolverServicer(core)
    service = await start_server(
        "solver", address, settings, provider, lambda server: solver_servicer.add_to_server(servicer, server), inner=True
    )
    service.channels += channels
    service.engine = engine if own_engine else None
    service.core = core
    if not kv_budget_bytes:
        await adopt_engine_limits(engine, core.kv_ledger)
    service.tasks.append(
        asyncio.create_task(follow_engine_health(engine, service, engine_health_seconds, None if kv_budget_bytes else core.kv_ledger))
    )
    return service


async def follow_engine_load(engine: Engine, ledger: KVLedger) -> None:
    """On a shared SGLang server, KV held by other solvers counts against this one's budget."""
    tokens_in_use = getattr(engine, "tokens_in_use", None)
    if tokens_in_use is None:
        return
    try:
        tokens = await asyncio.wait_for(tokens_in_use(), ENGINE_HEALTH_TIMEOUT_SECONDS)
    except Exception:
        return
    per_token = _kv_cost(engine)
    if tokens is not None and per_token:
        held = min(max(0, tokens), getattr(engine, "kv_capacity_tokens", 0) or tokens)
        await ledger.set_external(held * per_token - ledger.in_use)


def _kv_cost(engine: Engine) -> int:
    """KV bytes per token, or 0 while the engine has not said."""
    try:
        return engine.kv_bytes_per_token
    except Unavailable:
        return 0


async def adopt_engine_limits(engine: Engine, ledger: KVLedger | None) -> None:
    """An engine that can describe itself (SGLang) sets the model name and the KV budget: the
    solver admits requests against the server's real KV pool, not a guess."""
    describe = getattr(engine, "describe", None)
    if describe is None:
        return
    try:
        described = await asyncio.wait_for(describe(), ENGINE_HEALTH_TIMEOUT_SECONDS)
    except Exception:
        described = False
    tokens = getattr(engine, "kv_capacity_tokens", 0)
    per_token = _kv_cost(engine)
    if described and tokens and per_token and ledger is not None:
        await ledger.set_capacity(tokens * per_token)
        log.info("engine %s: KV pool of %d tokens, %d bytes each", engine.model_name, tokens, per_token)


async def follow_engine_health(engine: Engine, service: RunningService, interval: float, ledger: KVLedger | None = None) -> None:
    """The solver is SERVING only while its engine answers: a balancer stops sending it work
    while SGLang is down, and sends it again when SGLang is back."""
    serving = True
    while True:
        await asyncio.sleep(interval)
        try:
            healthy = await asyncio.wait_for(engine.healthy(), ENGINE_HEALTH_TIMEOUT_SECONDS)
        except Exception:
            healthy = False
        problem = readiness_problem(engine)
        if healthy and (not serving or problem):
            # Back, or never described: read the model (hence its template) and its limits again.
            await adopt_engine_limits(engine, ledger)
            problem = readiness_problem(engine)
        if healthy and ledger is not None:
            await follow_engine_load(engine, ledger)
        ready = healthy and not problem
        if ready != serving:
            serving = ready
            why = "answers again" if ready else ("unreachable" if not healthy else problem)
            log.warning("engine %s: solver now %s", why, "SERVING" if ready else "NOT_SERVING")
            await grpc_edge.set_serving(service.health, service.service_names, ready)


def readiness_problem(engine: Engine) -> str:
    check = getattr(engine, "readiness_problem", None)
    return check() if check is not None else ""


async def start(env: Mapping[str, str]) -> list[RunningService]:
    """The solver alone, on the engine ``env`` names, calling the verifier at its address."""
    addresses = Addresses.load(env)
    config = SolverConfig.load(env)
    engine = create_engine(config)
    try:
        service = await start_solver(
            addresses.solver,
            ServerSettings.load(env),
            provider_factory(env)("solver"),
            addresses.verifier,
            engine,
            True,
            config.resolved_answer_style,
            config.kv_budget_bytes,
            config.kv_wait_seconds,
            code_verifier_address=addresses.code_verifier,
            engine_health_seconds=config.engine_health_seconds,
        )
    except BaseException:
        await engine.aclose()
        raise
    return [service]
