"""All of the mesh in one process (``rmesh serve``, ``make run``), or any one service of it.

With all three services in one process the router and the solver call their peers' cores
directly (``in_process``) unless ``RMESH_COLOCATED_CALLS=0``; every service still serves its
own gRPC port for health and for other callers.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from opentelemetry.sdk.trace import SpanProcessor

from rmesh.config import Addresses, RouterConfig, ServerSettings, SolverConfig, VerifierConfig
from rmesh.engine import Engine, create_engine
from rmesh.mesh.in_process import InProcessSolver, InProcessVerifier
from rmesh.router_svc.policy.store import PolicyStore
from rmesh.router_svc.reviews import open_store
from rmesh.router_svc.serve import start_router
from rmesh.serving import RunningService, bound_address, provider_factory
from rmesh.solver_svc.serve import start_solver
from rmesh.verifier_svc.serve import build_scorer, start_verifier

SERVICES = ("verifier", "solver", "router")


async def start_services(
    names: tuple[str, ...],
    env: Mapping[str, str],
    engine: Engine | None = None,
    extra_processors: list[SpanProcessor] | None = None,
) -> list[RunningService]:
    """Start the named services in dependency order on the addresses ``env`` gives. With all
    three in one process and no service token or mesh TLS configured, they share a token made
    here: the solver's and verifier's ports still answer only the mesh."""
    if set(SERVICES) <= set(names) and not env.get("RMESH_SERVICE_TOKEN") and not env.get("RMESH_MESH_TLS_CERT"):
        env = {**env, "RMESH_SERVICE_TOKEN": secrets.token_urlsafe(32)}
    addresses = Addresses.load(env)
    settings = ServerSettings.load(env)
    started: list[RunningService] = []
    provider = provider_factory(env, extra_processors)

    verifier_addr, solver_addr = addresses.verifier, addresses.solver
    solver_config = SolverConfig.load(env)
    own = engine is None
    # All three in this process (unless told otherwise): internal hops call the peer's core, not loopback gRPC.
    # (A separate code verifier is reached over gRPC, so then every verifier call is.)
    colocated = (
        env.get("RMESH_COLOCATED_CALLS", "1") == "1" and {"router", "solver", "verifier"} <= set(names)
        and not addresses.code_verifier
    )
    local_verifier = None
    if "solver" in names and engine is None:
        engine = create_engine(solver_config)
    try:
        if "verifier" in names:
            # In one process the judge shares the solver's engine (its queue serialises them).
            shared = engine if solver_config.engine == "embedded" else None
            verifier_config = VerifierConfig.load(env)
            scorer, calibration, judge_engine = build_scorer(verifier_config, shared)
            service = await start_verifier(verifier_addr, settings, provider("verifier"), scorer, calibration, verifier_config)
            service.engine = judge_engine
            verifier_addr = bound_address(verifier_addr, service.port)
            started.append(service)
            if colocated:
                local_verifier = InProcessVerifier(service.core, service.provider.get_tracer("rmesh.verifier"))
        if "solver" in names:
            service = await start_solver(
                solver_addr,
                settings,
                provider("solver"),
                verifier_addr,
                engine,
                own,
                solver_config.resolved_answer_style,
                solver_config.kv_budget_bytes,
                solver_config.kv_wait_seconds,
                verifier=local_verifier,
                code_verifier_address=addresses.code_verifier,
                engine_health_seconds=solver_config.engine_health_seconds,
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
                    code_verifier_address=addresses.code_verifier,
                    admission_lease_seconds=router_config.admission_lease_seconds,
                    tool_secrets_dir=router_config.tool_secrets_dir,
                )
            )
    except BaseException:
        for service in reversed(started):
            await service.stop(0)
        if own and engine is not None and not any(s.engine is engine for s in started):
            await engine.aclose()
        raise
    return started
