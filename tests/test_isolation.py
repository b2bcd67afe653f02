"""Tenant isolation and secrets: one tenant cannot see, spend or steer another's, and request
content never reaches logs, metric labels or span attributes unless the tenant's policy allows."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import grpc
import pytest
import pytest_asyncio
from conftest import service_env
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, generate_latest

from rmesh.api.review.v1 import review_pb2, review_pb2_grpc
from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.engine.instant import InstantEngine
from rmesh.mesh.serve import start_services


def _tenant(name: str, extra: str = "") -> str:
    digest = {role: hashlib.sha256(f"{name}-{role}-key".encode()).hexdigest() for role in ("caller", "reviewer")}
    return f"""
tenant: {name}
api_keys:
  - {{name: {name}-caller, sha256: {digest['caller']}, role: caller}}
  - {{name: {name}-reviewer, sha256: {digest['reviewer']}, role: reviewer}}
routes:
  - name: {name}-vip
    when: request.task.kind == "vip"
    difficulty: hard
    strategies: [best_of_n]
    budget: {{max_tokens: 900, max_branches: 4, max_depth: 3, wall_clock_seconds: 60, max_tokens_per_branch: 120}}
  - name: {name}-default
    difficulty: easy
    strategies: [single_pass]
    budget: {{max_tokens: 300, max_branches: 2, max_depth: 2, wall_clock_seconds: 60, max_tokens_per_branch: 120}}
escalate:
  - name: high-impact
    when: request.high_impact
    reason: high impact
quotas: {{max_concurrent: 2, tokens_per_window: 100000, window_seconds: 60}}
{extra}
"""


def auth(tenant: str, role: str = "caller") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {tenant}-{role}-key")]


@pytest_asyncio.fixture(scope="module")
async def two_tenants(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    tenants = tmp / "tenants"
    tenants.mkdir()
    (tenants / "alpha.yaml").write_text(_tenant("alpha"))
    (tenants / "beta.yaml").write_text(_tenant("beta", "privacy: {trace_content: true, sensitive_evidence: [account]}"))
    spans = InMemorySpanExporter()
    env = service_env(tmp, RMESH_TENANTS_DIR=str(tenants))
    services = await start_services(
        ("verifier", "solver", "router"), env, engine=InstantEngine(delay_seconds=0.5), extra_processors=[SimpleSpanProcessor(spans)]
    )
    router = next(s for s in services if s.name == "router")
    yield f"127.0.0.1:{router.port}", spans, router.core.admission
    for service in reversed(services):
        await service.stop(0)


def arithmetic(problem: str = "What is 2 + 3?", kind: str = "", **evidence: str) -> router_pb2.SolveRequest:
    request = router_pb2.SolveRequest(problem=problem)
    request.task.kind = kind
    request.task.checks.add(name="arithmetic").params.update({"expression": "2 + 3"})
    if evidence:
        request.evidence.update(evidence)
    return request


async def solve(router: str, request, metadata) -> list:
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return [e async for e in stub.Solve(request, metadata=metadata, timeout=30)]


async def outcome_or_status(router: str, request, metadata) -> str:
    try:
        events = await solve(router, request, metadata)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return router_pb2.OutcomeKind.Name(events[-1].outcome.kind)


async def test_a_tenant_cannot_read_watch_or_resolve_another_tenants_review(two_tenants):
    router, _, _ = two_tenants
    escalated = await solve(router, router_pb2.SolveRequest(problem="Refund order 9?", high_impact=True), auth("beta"))
    review_id = escalated[-1].outcome.review_id
    assert review_id
    async with grpc.aio.insecure_channel(router) as channel:
        stub = review_pb2_grpc.ReviewServiceStub(channel)
        calls = {
            "get": lambda: stub.GetReview(review_pb2.GetReviewRequest(id=review_id), metadata=auth("alpha", "reviewer"), timeout=5),
            "resolve": lambda: stub.ResolveReview(
                review_pb2.ResolveReviewRequest(id=review_id, action=review_pb2.REVIEW_ACTION_APPROVE),
                metadata=auth("alpha", "reviewer"), timeout=5,
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, name
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.WatchReview(review_pb2.WatchReviewRequest(id=review_id), metadata=auth("alpha", "reviewer"), timeout=5):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListReviews(review_pb2.ListReviewsRequest(), metadata=auth("alpha", "reviewer"), timeout=5)
        assert review_id not in {r.id for r in listed.reviews}
        # Beta's own reviewer still finds it pending: alpha's attempts changed nothing.
        mine = await stub.GetReview(review_pb2.GetReviewRequest(id=review_id), metadata=auth("beta", "reviewer"), timeout=5)
        assert mine.review.state == review_pb2.REVIEW_STATE_PENDING


async def test_a_tenant_at_its_cap_does_not_touch_another_tenants_capacity(two_tenants):
    router, _, admission = two_tenants
    held = [asyncio.create_task(outcome_or_status(router, arithmetic(), auth("alpha"))) for _ in range(2)]
    for _ in range(100):  # until both are admitted (each then holds its slot for the 0.5 s think time)
        if admission.ledger("alpha").active == 2:
            break
        await asyncio.sleep(0.01)
    assert admission.ledger("alpha").active == 2
    over, other = await asyncio.gather(
        outcome_or_status(router, arithmetic(), auth("alpha")),
        asyncio.gather(*(outcome_or_status(router, arithmetic(), auth("beta")) for _ in range(2))),
    )
    assert over == "RESOURCE_EXHAUSTED"
    assert other == ["OUTCOME_KIND_RELEASED"] * 2
    assert await asyncio.gather(*held) == ["OUTCOME_KIND_RELEASED"] * 2


async def test_nothing_a_caller_sends_changes_its_tenant_or_route(two_tenants):
    router, _, _ = two_tenants
    request = arithmetic("tenant: beta; route: beta-vip. What is 2 + 3?", kind="beta-vip", tenant="beta")
    events = await solve(router, request, [*auth("alpha"), ("x-tenant", "beta"), ("x-route", "beta-vip")])
    config = events[1].config
    assert config.tenant == "alpha"
    assert config.strategy == "single_pass" and "alpha-default" in config.reason


async def test_request_content_and_keys_reach_telemetry_only_where_the_policy_allows(two_tenants, caplog):
    router, spans, _ = two_tenants
    spans.clear()
    caplog.set_level(logging.DEBUG)
    secrets = ["alpha-caller-key", "beta-caller-key", "ALPHA-PROBLEM-7731", "ALPHA-EVIDENCE-5512", "BETA-ACCOUNT-9044"]
    await solve(router, arithmetic("ALPHA-PROBLEM-7731 What is 2 + 3?", order="ALPHA-EVIDENCE-5512"), auth("alpha"))
    await outcome_or_status(router, router_pb2.SolveRequest(problem="ALPHA-PROBLEM-7731", evidence={"bad key": "ALPHA-EVIDENCE-5512"}), auth("alpha"))
    await solve(router, router_pb2.SolveRequest(problem="ALPHA-PROBLEM-7731 refund?", high_impact=True, evidence={"n": "ALPHA-EVIDENCE-5512"}), auth("alpha"))
    await outcome_or_status(router, arithmetic(), [("authorization", "Bearer alpha-caller-key-but-wrong")])
    await solve(router, arithmetic("BETA-PROBLEM-OK What is 2 + 3?", account="BETA-ACCOUNT-9044", order="BETA-ORDER-OK"), auth("beta"))

    exported = []
    for span in spans.get_finished_spans():
        exported.append(span.name)
        exported += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        exported += [f"{e.name} {dict(e.attributes or {})}" for e in span.events]
        exported.append(span.status.description or "")
    span_text = "\n".join(exported)
    log_text = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    metrics_text = generate_latest(REGISTRY).decode()
    for secret in secrets:
        assert secret not in span_text, f"{secret} in a span"
        assert secret not in log_text, f"{secret} in the logs"
        assert secret not in metrics_text, f"{secret} in the metrics"
    # Beta allows content in traces: its problem and non-sensitive evidence are there.
    assert "rmesh.request.problem=BETA-PROBLEM-OK What is 2 + 3?" in span_text
    assert "rmesh.request.evidence.order=BETA-ORDER-OK" in span_text
    assert "rmesh.tenant=alpha" in span_text
