"""Releases say how they were assured: exact checks, evidence, a calibrated learned score, a
human, or explicitly unverified; a route's minimum decides what happens below it. Real services
on real ports with the shipped tenants (and one tenant file written here for the route options);
the calibrated gate uses the real embedded model as its judge."""

from __future__ import annotations

import hashlib
import json
import shutil

import grpc
import pytest_asyncio
import pytest
from conftest import ROOT, service_env

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.engine.instant import InstantEngine
from rmesh.mesh.serve import start_services
from rmesh.verifier_svc.scorers import GenerativeJudge

STRICT_TENANT = f"""
tenant: strict
api_keys:
  - {{name: app, sha256: {hashlib.sha256(b"strict-key").hexdigest()}, role: caller}}
routes:
  - name: payouts
    when: request.task.kind == "payout"
    difficulty: easy
    strategies: [best_of_n]
    budget: {{max_tokens: 400, max_branches: 2, max_depth: 2, wall_clock_seconds: 30, max_tokens_per_branch: 100}}
    high_impact: true
  - name: reports
    when: request.task.kind == "report"
    difficulty: easy
    strategies: [best_of_n]
    budget: {{max_tokens: 400, max_branches: 2, max_depth: 2, wall_clock_seconds: 30, max_tokens_per_branch: 100}}
    min_assurance: exact_checks
    below_min_assurance: escalate
  - name: rest
    difficulty: easy
    strategies: [best_of_n]
    budget: {{max_tokens: 400, max_branches: 2, max_depth: 2, wall_clock_seconds: 30, max_tokens_per_branch: 100}}
    min_assurance: exact_checks
"""


@pytest_asyncio.fixture
async def router(tmp_path):
    tenants = tmp_path / "tenants"
    shutil.copytree(ROOT / "policy" / "tenants", tenants)
    (tenants / "strict.yaml").write_text(STRICT_TENANT)
    services = await start_services(
        ("verifier", "solver", "router"), service_env(tmp_path, RMESH_TENANTS_DIR=str(tenants)), engine=InstantEngine()
    )
    yield f"127.0.0.1:{services[-1].port}"
    for service in reversed(services):
        await service.stop(0)


async def outcome_of(address: str, request: router_pb2.SolveRequest, key: str = "demo-key") -> router_pb2.Outcome:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        events = [e async for e in stub.Solve(request, metadata=[("authorization", f"Bearer {key}")], timeout=60)]
    return events[-1].outcome


def with_check(problem: str = "What is 2 + 3?", **fields) -> router_pb2.SolveRequest:
    request = router_pb2.SolveRequest(problem=problem, **fields)
    request.task.checks.add(name="arithmetic").params.update({"expression": "2 + 3"})
    return request


async def test_an_exact_check_is_the_assurance_and_the_reason_says_so(router):
    outcome = await outcome_of(router, with_check())
    assert outcome.released and outcome.assurance == router_pb2.ASSURANCE_EXACT_CHECKS
    assert outcome.reason == "released: every exact check passed"
    # A high-impact request with an exact check that passes is released: it is not unverified.
    outcome = await outcome_of(router, with_check(high_impact=True))
    assert outcome.released and outcome.assurance == router_pb2.ASSURANCE_EXACT_CHECKS


async def test_no_check_no_evidence_releases_only_as_explicitly_unverified(router):
    outcome = await outcome_of(router, router_pb2.SolveRequest(problem="Say something."))
    assert outcome.released and outcome.assurance == router_pb2.ASSURANCE_UNVERIFIED
    assert outcome.reason.startswith("released: unverified: no exact check, no required evidence and no calibrated score")


async def test_a_high_impact_route_never_releases_unverified(router):
    outcome = await outcome_of(router, router_pb2.SolveRequest(problem="Pay out 500?", task={"kind": "payout"}), "strict-key")
    assert outcome.kind == router_pb2.OUTCOME_KIND_NO_ELIGIBLE_ANSWER and not outcome.answer
    assert outcome.assurance == router_pb2.ASSURANCE_UNSPECIFIED
    assert outcome.next_step == "add_exact_check_or_evidence"
    assert outcome.reason == "not released: its assurance (unverified) is below the minimum (calibrated_score) for a high-impact request"
    # With an exact check the same route releases.
    request = with_check(task={"kind": "payout"})
    request.task.checks.add(name="arithmetic").params.update({"expression": "2 + 3"})
    assert (await outcome_of(router, request, "strict-key")).assurance == router_pb2.ASSURANCE_EXACT_CHECKS


async def test_below_the_routes_minimum_withholds_or_escalates_as_the_route_says(router):
    withheld = await outcome_of(router, router_pb2.SolveRequest(problem="Summarise."), "strict-key")
    assert withheld.kind == router_pb2.OUTCOME_KIND_NO_ELIGIBLE_ANSWER
    assert "below the minimum (exact_checks)" in withheld.reason
    escalated = await outcome_of(router, router_pb2.SolveRequest(problem="Summarise.", task={"kind": "report"}), "strict-key")
    assert escalated.kind == router_pb2.OUTCOME_KIND_ESCALATED and escalated.review_id
    assert escalated.reason == "escalated to human review: its assurance (unverified) is below the route's minimum (exact_checks)"


async def test_python_tests_is_refused_for_a_tenant_that_did_not_opt_in(router):
    request = router_pb2.SolveRequest(problem="Write f.")
    request.task.checks.add(name="arithmetic").params.update({"expression": "2 + 3"})
    request.task.checks.add(name="python_tests").params.update({"tests": "assert f() == 1"})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await outcome_of(router, request)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details().startswith("task.checks[1].name: python_tests runs caller code and is not enabled for tenant demo")


async def test_with_a_calibration_the_learned_gate_applies_at_the_final_gate(engine, tmp_path):
    """The real model judges; the calibration file's threshold decides. At 0 every answer clears
    it (calibrated_score); above 1 none can, and nothing is released."""
    for threshold, released in ((0.0, True), (1.01, False)):
        calibration = tmp_path / f"judge-{threshold}.json"
        calibration.write_text(json.dumps({
            "scorer": GenerativeJudge(engine).name, "threshold": threshold, "max_n": 4, "auroc": 0.5, "ece": 0.1,
        }))
        env = service_env(tmp_path, RMESH_JUDGE="embedded", RMESH_JUDGE_CALIBRATION=str(calibration))
        services = await start_services(("verifier", "solver", "router"), env, engine=engine)
        try:
            outcome = await outcome_of(f"127.0.0.1:{services[-1].port}", router_pb2.SolveRequest(problem="Name a colour."))
        finally:
            for service in reversed(services):
                await service.stop(0)
        if released:
            assert outcome.released and outcome.assurance == router_pb2.ASSURANCE_CALIBRATED_SCORE, outcome.reason
            assert outcome.reason == "released: its calibrated learned score cleared the release threshold"
        else:
            assert not outcome.released and outcome.assurance == router_pb2.ASSURANCE_UNSPECIFIED
            assert "calibrated learned score" in outcome.reason and "below the release threshold" in outcome.reason


async def test_a_format_check_alone_is_not_an_exact_check(router):
    """A caller's own regex ".*" passes every answer: it must pass, but it verifies nothing."""
    request = router_pb2.SolveRequest(problem="Approve a refund of 900?")
    request.task.checks.add(name="regex").params.update({"pattern": ".*"})
    outcome = await outcome_of(router, request)
    assert outcome.released and outcome.assurance == router_pb2.ASSURANCE_UNVERIFIED
    assert [c.name for c in outcome.checks] == ["regex"] and outcome.checks[0].passed
    # Marked high-impact, the shipped demo tenant still sends it to a person.
    request.high_impact = True
    escalated = await outcome_of(router, request)
    assert escalated.kind == router_pb2.OUTCOME_KIND_ESCALATED and "no exact check" in escalated.reason
