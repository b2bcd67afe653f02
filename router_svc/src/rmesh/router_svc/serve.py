"""The router service: the public Solve API and the review API, on one server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.trace import TracerProvider

from rmesh import grpc_edge, metrics, peers
from rmesh.config import Addresses, RouterConfig, ServerSettings
from rmesh.router_svc import servicer as router_servicer
from rmesh.router_svc.core import RouterCore, SolverPort
from rmesh.router_svc.policy.store import PolicyStore
from rmesh.router_svc.review_servicer import ReviewServicer
from rmesh.router_svc.review_servicer import add_to_server as review_add
from rmesh.router_svc.quotas import Admission, SharedAdmission
from rmesh.router_svc.reviews import PostgresReviewStore, ReviewStore, open_store
from rmesh.router_svc.tools import EvidenceTools
from rmesh.serving import RunningService, provider_factory, start_server
from rmesh.solving import VerifierPort

log = logging.getLogger("rmesh.serve")
# Health entry that reports whether the last policy reload succeeded.
POLICY_HEALTH = "rmesh.policy"


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
    code_verifier_address: str = "",
    admission_lease_seconds: float = 30.0,
    tool_secrets_dir: str = "",
) -> RunningService:
    """The router and review services; ``verifier`` and ``solver`` replace the gRPC clients;
    ``code_verifier_address`` names a separate verifier for tasks with code checks."""
    verifier_client, verifier_channels = peers.verifier_port(verifier_address, code_verifier_address, settings, provider)
    solver_channel = grpc_edge.create_channel(solver_address, settings, tracer_provider=provider)
    store = review_store or open_store(RouterConfig().review_db)
    # With PostgreSQL the tenants' caps hold across every router sharing it; else in memory.
    shared = isinstance(store, PostgresReviewStore)
    admission = SharedAdmission(store.url, admission_lease_seconds, store.pool) if shared else Admission()
    log.info(
        "tenant quotas: %s",
        f"shared by every router on this PostgreSQL (lease {admission_lease_seconds:.0f} s)" if shared
        else "this router's own (one router; set a postgresql:// RMESH_REVIEW_DB to share them)",
    )
    core = RouterCore(
        verifier or verifier_client, solver or peers.SolverClient(solver_channel), admission=admission, reviews=store,
        tools=EvidenceTools(tool_secrets_dir, tracer=provider.get_tracer("rmesh.router.tools")),
    )
    router = router_servicer.RouterServicer(core, policies)
    review = ReviewServicer(store, policies)

    def add_both(server: grpc.aio.Server) -> list[str]:
        return router_servicer.add_to_server(router, server) + review_add(review, server)

    service = await start_server("router", address, settings, provider, add_both)
    service.channels += [*verifier_channels, solver_channel]

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
    if isinstance(admission, SharedAdmission):
        service.tasks.append(asyncio.create_task(admission.heartbeat()))
    return service


async def start(env: Mapping[str, str]) -> list[RunningService]:
    """The router alone, calling the solver and verifier at the addresses ``env`` names."""
    addresses = Addresses.load(env)
    config = RouterConfig.load(env)
    policies = PolicyStore(config.tenants_dir)
    service = await start_router(
        addresses.router,
        ServerSettings.load(env),
        provider_factory(env)("router"),
        addresses.solver,
        addresses.verifier,
        policies,
        config.reload_interval,
        open_store(config.review_db),
        code_verifier_address=addresses.code_verifier,
        admission_lease_seconds=config.admission_lease_seconds,
        tool_secrets_dir=config.tool_secrets_dir,
    )
    return [service]
