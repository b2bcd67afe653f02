"""Start the mesh's services on their addresses; stop them gracefully."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from rmesh import clients, grpc_edge, metrics
from rmesh.config import Addresses, RouterConfig, ServerSettings, SolverConfig, VerifierConfig
from rmesh.engine import Engine, create_engine
from rmesh.in_process import InProcessSolver, InProcessVerifier
from rmesh.router_svc import servicer as router_servicer
from rmesh.router_svc.core import RouterCore, SolverPort
from rmesh.router_svc.review_servicer import ReviewServicer
from rmesh.router_svc.review_servicer import add_to_server as review_add
from rmesh.router_svc.reviews import ReviewStore, open_store
from rmesh.policy.store import PolicyStore
from rmesh.solver_svc import servicer as solver_servicer
from rmesh.solver_svc.core import SolverCore
from rmesh.solver_svc.kv_budget import KVLedger
from rmesh.solver_svc.model import VerifierPort
from rmesh.telemetry import tracer_provider
from rmesh.verifier_svc import servicer as verifier_servicer
from rmesh.verifier_svc.core import VerifierCore
from rmesh.verifier_svc.scorers import GenerativeJudge, SGLangRewardModel, load_calibration

log = logging.getLogger("rmesh.serve")
# Health entry that reports whether the last policy reload succeeded.
POLICY_HEALTH = "rmesh.policy"
SERVICES = ("verifier", "solver", "router")


@dataclass
class RunningService:
    name: str
    server: grpc.aio.Server
    port: int
    health: object
    service_names: list[str]
    provider: TracerProvider
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    engine: Engine | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    policies: PolicyStore | None = None
    reviews: ReviewStore | None = None
    core: object = None  # the service's core; a router's pending writes are drained on stop

    async def stop(self, grace: float) -> None:
        for task in self.tasks:
            task.cancel()
        await grpc_edge.graceful_stop(self.server, self.health, self.service_names, grace)
        if hasattr(self.core, "drain"):
            await self.core.drain()
        for channel in self.channels:
            await channel.close()
        if self.engine is not None:
            await self.engine.aclose()
        self.provider.shutdown()


async def _start(name, address, settings, provider, add) -> RunningService:
    server, port, health, names = grpc_edge.create_server(address, settings, add, tracer_provider=provider)
    await server.start()
    service = RunningService(name, server, port, health, names, provider)
    await grpc_edge.set_serving(health, names, True)
    log.info("%s serving on %s (port %d)", name, address, port)
    return service


def build_scorer(config: VerifierConfig, engine: Engine | None):
    """The learned scorer the configuration names, with its calibration if one exists."""
    if config.judge == "off":
        return None, None
    if config.judge == "embedded":
        if engine is None:
            engine = create_engine(SolverConfig(engine="embedded"))
        scorer = GenerativeJudge(engine)
    else:
        scorer = SGLangRewardModel(config.reward_url)
    return scorer, load_calibration(config.calibration_path, scorer.name)


async def start_verifier(
    address: str, settings: ServerSettings, provider: TracerProvider, scorer=None, calibration=None
) -> RunningService:
    core = VerifierCore(scorer=scorer, calibration=calibration)
    servicer = verifier_servicer.VerifierServicer(core)
    service = await _start("verifier", address, settings, provider, lambda server: verifier_servicer.add_to_server(servicer, server))
    service.core = core
    return service


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
) -> RunningService:
    """The solver service; ``verifier`` replaces the gRPC client (an in-process port)."""
    channel = grpc_edge.create_channel(
        verifier_address, settings, [clients.VERIFIER_SERVICE], tracer_provider=provider
    )
    # Default budget: what the engine's own context can hold (the embedded engine), else 8 GiB.
    n_ctx = getattr(engine, "n_ctx", 0)
    capacity = kv_budget_bytes or (n_ctx * engine.kv_bytes_per_token if n_ctx else 8 << 30)
    core = SolverCore(
        engine,
        verifier or clients.VerifierClient(channel),
        tracer=provider.get_tracer("rmesh.solver"),
        answer_style=answer_style,
        kv_ledger=KVLedger(capacity, kv_wait_seconds),
    )
    servicer = solver_servicer.SolverServicer(core)
    service = await _start("solver", address, settings, provider, lambda server: solver_servicer.add_to_server(servicer, server))
    service.channels.append(channel)
    service.engine = engine if own_engine else None
    service.core = core
    return service


async def start_router(
    address: str,
    settings: ServerSettings,
    provider: TracerProvider,
    solver_address: str,
    verifier_address: str,
    policies: PolicyStore,
    reload_interval: float = 1.0,
    review_store: ReviewStore | None = None,
    verifier: VerifierPort | None = None,
    solver: SolverPort | None = None,
) -> RunningService:
    """The router and review services; ``verifier`` and ``solver`` replace the gRPC clients."""
    verifier_channel = grpc_edge.create_channel(
        verifier_address, settings, [clients.VERIFIER_SERVICE], tracer_provider=provider
    )
    solver_channel = grpc_edge.create_channel(solver_address, settings, tracer_provider=provider)
    store = review_store or open_store(RouterConfig().review_db)
    core = RouterCore(
        verifier or clients.VerifierClient(verifier_channel), solver or clients.SolverClient(solver_channel), reviews=store
    )
    router = router_servicer.RouterServicer(core, policies)
    review = ReviewServicer(store, policies)

    def add_both(server: grpc.aio.Server) -> list[str]:
        return router_servicer.add_to_server(router, server) + review_add(review, server)

    service = await _start("router", address, settings, provider, add_both)
    service.channels += [verifier_channel, solver_channel]

    async def reported(status) -> None:
        # The router keeps serving on the last good policy; health and metrics show the reload.
        metrics.record_reload(status, policies.snapshot)
        await service.health.set(
            POLICY_HEALTH, health_pb2.HealthCheckResponse.SERVING if status.ok else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    await reported(policies.status)
    if reload_interval > 0:
        service.tasks.append(asyncio.create_task(policies.watch(reload_interval, reported)))
    service.policies = policies
    service.reviews = store
    service.core = core

    async def expire_reviews() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await asyncio.to_thread(store.expire_due)
                metrics.REVIEW_QUEUE.set(await asyncio.to_thread(store.pending_count))
            except Exception:
                log.exception("expiring reviews failed; retrying")

    service.tasks.append(asyncio.create_task(expire_reviews()))
    return service


def bound_address(address: str, port: int) -> str:
    """The address clients should use once a server bound ``address`` (port 0 picks one)."""
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


async def start_services(
    names: tuple[str, ...],
    env: Mapping[str, str],
    engine: Engine | None = None,
    extra_processors: list[SpanProcessor] | None = None,
) -> list[RunningService]:
    """Start the named services in dependency order on the addresses ``env`` gives."""
    addresses = Addresses.load(env)
    settings = ServerSettings.load(env)
    started: list[RunningService] = []

    prefix = env.get("RMESH_SERVICE_NAME_PREFIX", "rmesh")

    def provider(name: str) -> TracerProvider:
        return tracer_provider(f"{prefix}-{name}", env, extra_processors)

    verifier_addr, solver_addr = addresses.verifier, addresses.solver
    solver_config = SolverConfig.load(env)
    own = engine is None
    # All three in this process (unless told otherwise): internal hops call the peer's core, not loopback gRPC.
    colocated = env.get("RMESH_COLOCATED_CALLS", "1") == "1" and {"router", "solver", "verifier"} <= set(names)
    local_verifier = None
    if "solver" in names and engine is None:
        engine = create_engine(solver_config)
    try:
        if "verifier" in names:
            # In one process the judge shares the solver's engine (its queue serialises them).
            verifier_config = VerifierConfig.load(env)
            shared = engine if solver_config.engine == "embedded" else None
            scorer, calibration = build_scorer(verifier_config, shared)
            service = await start_verifier(verifier_addr, settings, provider("verifier"), scorer, calibration)
            verifier_addr = bound_address(verifier_addr, service.port)
            started.append(service)
            if colocated:
                local_verifier = InProcessVerifier(service.core, service.provider.get_tracer("rmesh.verifier"))
        if "solver" in names:
            solver_engine = engine
            service = await start_solver(
                solver_addr,
                settings,
                provider("solver"),
                verifier_addr,
                solver_engine,
                own,
                solver_config.resolved_answer_style,
                solver_config.kv_budget_bytes,
                solver_config.kv_wait_seconds,
                verifier=local_verifier,
            )
            solver_addr = bound_address(solver_addr, service.port)
            started.append(service)
        if "router" in names:
            router_config = RouterConfig.load(env)
            policies = PolicyStore(router_config.tenants_dir)
            started.append(
                await start_router(
                    addresses.router,
                    settings,
                    provider("router"),
                    solver_addr,
                    verifier_addr,
                    policies,
                    router_config.reload_interval,
                    open_store(router_config.review_db),
                    verifier=local_verifier,
                    solver=InProcessSolver(started[-1].core, started[-1].provider.get_tracer("rmesh.solver")) if colocated else None,
                )
            )
    except BaseException:
        for service in reversed(started):
            await service.stop(0)
        raise
    return started


async def run_forever(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain: NOT_SERVING first, then stop with grace."""
    env = dict(os.environ if env is None else env)
    settings = ServerSettings.load(env)
    services = await start_services(names, env)
    if env.get("RMESH_METRICS_ADDR"):
        port = metrics.serve_metrics(env["RMESH_METRICS_ADDR"])
        log.info("metrics on http://%s:%d/metrics", env["RMESH_METRICS_ADDR"].rpartition(":")[0] or "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("mesh ready: %s; Ctrl-C to stop", ", ".join(s.name for s in services))
    await stop.wait()
    log.info("stopping (grace %.0fs)", settings.grace_seconds)
    # The router stops first so no new work reaches the solver while it drains.
    for service in reversed(services):
        await service.stop(settings.grace_seconds)
    log.info("stopped")
