"""Thin gRPC servicer over RouterCore: authenticate, then stream the core's events."""

from __future__ import annotations

import grpc

from rmesh.router_svc import convert
from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.errors import MeshError
from rmesh import metrics
from rmesh.grpc_edge import abort, abort_internal, begin_call, status_code
from rmesh.router_svc.core import OUTCOME_ESCALATED, Outcome, RouterCore
from rmesh.solving import Progress
from rmesh.router_svc.policy.store import PolicyStore

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def _count(tenant: str, event) -> None:
    if isinstance(event, Progress) and event.stage.startswith("escalate"):
        metrics.ESCALATIONS.labels(kind="ladder").inc()
    elif isinstance(event, Outcome):
        metrics.REQUESTS.labels(tenant=tenant, outcome=metrics.OUTCOMES[event.kind]).inc()
        metrics.TOKENS_GENERATED.labels(tenant=tenant).inc(event.usage.completion_tokens)
        metrics.TOKENS_CACHED.labels(tenant=tenant).inc(event.usage.cached_tokens)
        if event.kind == OUTCOME_ESCALATED:
            metrics.ESCALATIONS.labels(kind="human_review").inc()


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, core: RouterCore, policies: PolicyStore) -> None:
        self.core = core
        self.policies = policies

    async def Solve(self, request, context: grpc.aio.ServicerContext):
        deadline = begin_call(context)
        metadata = dict(context.invocation_metadata() or ())
        try:
            policy, key = self.policies.authenticate(metadata.get("authorization"))
            async for event in self.core.solve(policy, convert.router_request_from_proto(request), key.name, deadline):
                _count(policy.tenant, event)
                yield convert.router_event_to_proto(event)
        except MeshError as exc:
            metrics.REQUESTS.labels(tenant="-", outcome=f"error:{status_code(exc).name.lower()}").inc()
            await abort(context, exc)
        except Exception as exc:
            await abort_internal(context, exc)


def add_to_server(servicer: RouterServicer, server: grpc.aio.Server) -> list[str]:
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    return [SERVICE_NAME]
