"""Tenant policy: load-time checks that name file, line and rule; decisions; CLI; hot reload;
quotas with reservation; escalation."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import pathlib
import shutil
import subprocess
import sys
import textwrap

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import yaml
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from conftest import SETTINGS
from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.config import ServerSettings
from rmesh.errors import ResourceExhausted
from rmesh.router_svc.policy.engine import DecisionCache, decide, policy_reads
from rmesh.router_svc.policy.loader import PolicyError, parse_policy, sample_view
from rmesh.router_svc.policy.model import Quotas
from rmesh.router_svc.policy.store import PolicyStore
from rmesh.router_svc.quotas import Admission
from rmesh.router_svc.serve import POLICY_HEALTH, start_router
from rmesh.telemetry import tracer_provider
from tests.fuzzing import examples

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = hashlib.sha256(b"k").hexdigest()


DEFAULT_ROUTES = """
- name: maths
  when: request.task.kind == "arithmetic"
  difficulty: medium
  strategies: [best_of_n]
  budget: {max_tokens: 500, max_branches: 4}
- name: default
  difficulty: easy
  strategies: [single_pass]
  budget: {max_tokens: 200, max_branches: 1}
"""


def policy_text(routes: str = DEFAULT_ROUTES, extra: str = "", variables: str = "") -> str:
    """A tenant file: header on lines 1-3, then variables, then routes (first route on line 5
    when there are no variables), then anything extra."""
    header = f"tenant: t\napi_keys:\n  - {{name: caller, sha256: {KEY}}}\n"
    blocks = [textwrap.dedent(variables).strip("\n"), "routes:", textwrap.dedent(routes).strip("\n"), textwrap.dedent(extra).strip("\n")]
    return header + "\n".join(b for b in blocks if b) + "\n"


def guarded(name: str, when: str) -> str:
    """Routes for policy_text: ``name`` guarded by ``when`` (its line is the file's 6th), then the
    catch-all."""
    return f"""
- name: {name}
  when: {when}
  difficulty: easy
  strategies: [single_pass]
  budget: {{max_tokens: 1, max_branches: 1}}
- name: default
  difficulty: easy
  strategies: [single_pass]
  budget: {{max_tokens: 1, max_branches: 1}}
"""


def refused(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "t.yaml")
    return info.value


def test_a_good_policy_decides_first_match_wins():
    policy = parse_policy(policy_text(), "t.yaml")
    decision = decide(policy, sample_view("t", {"problem": "2+2", "task": {"kind": "arithmetic"}}))
    assert (decision.route, decision.strategy, decision.budget.max_tokens) == ("maths", "best_of_n", 500)
    assert decision.revision == policy.revision and len(policy.revision) == 12
    assert decide(policy, sample_view("t", {"problem": "hi"})).route == "default"


def test_syntax_error_names_file_line_and_rule():
    error = refused(policy_text(routes=guarded("broken", "request.high_impact &&")))
    assert (error.file, error.rule) == ("t.yaml", "route broken")
    assert error.line == 6 and "syntax error" in error.reason


def test_type_error_is_caught_at_load():
    error = refused(policy_text(routes=guarded("typed", "request.problem + 1 > 2")))
    assert error.rule == "route typed" and "type error" in error.reason


@pytest.mark.parametrize(
    ("expression", "reason"),
    [("request.customer_tier == 'gold'", "unknown request field 'customer_tier'"), ("tier == 1", "unknown identifier 'tier'"),
     ("variables.missing", "unknown variable 'missing'"), ("request.problem.lowerAscii() == 'x'", "unknown function 'lowerAscii'")],
)
def test_unknown_identifiers_are_refused(expression, reason):
    quoted = yaml.safe_dump(expression, default_style="'").strip()
    error = refused(policy_text(routes=guarded("r", quoted)))
    assert reason in error.reason and error.rule == "route r"


@pytest.mark.parametrize(
    ("expression", "reason"),
    [("(" * 1000 + "true" + ")" * 1000, "nests deeper than 64"), ("!" * 3000 + "true", "nests deeper than 64"),
     ("request.high_impact || " * 400 + "true", "longer than 4000 characters")],
    ids=["brackets", "negations", "length"],
)
def test_expressions_too_deep_or_long_are_refused_at_their_rule(expression, reason):
    """A tenant file cannot crash the loader (or the router's reload) with a huge expression."""
    error = refused(policy_text(routes=guarded("deep", yaml.safe_dump(expression, default_style="'", width=10**6).strip())))
    assert reason in error.reason and error.rule == "route deep" and error.line == 6


def test_a_file_that_breaks_the_loader_is_refused_and_reload_goes_on(tmp_path, monkeypatch):
    """Whatever a file makes the loader raise, that file is refused, the others load, and later
    reloads still happen."""
    from rmesh.router_svc.policy import store as store_module

    (tmp_path / "good.yaml").write_text(policy_text())
    (tmp_path / "bad.yaml").write_text(policy_text().replace("tenant: t", "tenant: b"))
    real = store_module.load_policy

    def explode_on_bad(path, *args, **kwargs):
        if pathlib.Path(path).name == "bad.yaml":
            raise RecursionError("maximum recursion depth exceeded")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store_module, "load_policy", explode_on_bad)
    store = PolicyStore(tmp_path)
    assert set(store.snapshot.policies) == {"t"} and not store.status.ok
    assert any("bad.yaml: could not be loaded (RecursionError" in e for e in store.status.errors)
    (tmp_path / "late.yaml").write_text(policy_text().replace("tenant: t", "tenant: late"))
    store.reload()
    assert set(store.snapshot.policies) == {"t", "late"}


def test_missing_catch_all_route_is_refused():
    error = refused(policy_text(routes="""
      - name: only
        when: request.high_impact
        difficulty: easy
        strategies: [single_pass]
        budget: {max_tokens: 1, max_branches: 1}
    """))
    assert "catch-all" in error.reason and error.rule == "route only"


def test_route_after_the_catch_all_is_unreachable():
    error = refused(policy_text(routes="""
      - name: default
        difficulty: easy
        strategies: [single_pass]
        budget: {max_tokens: 1, max_branches: 1}
      - name: never
        when: request.high_impact
        difficulty: easy
        strategies: [single_pass]
        budget: {max_tokens: 1, max_branches: 1}
    """))
    assert "unreachable" in error.reason and error.rule == "route never"


def test_duplicate_route_names_are_refused():
    error = refused(policy_text(routes="""
      - name: same
        when: request.high_impact
        difficulty: easy
        strategies: [single_pass]
        budget: {max_tokens: 1, max_branches: 1}
      - name: same
        difficulty: easy
        strategies: [single_pass]
        budget: {max_tokens: 1, max_branches: 1}
    """))
    assert "duplicate route name" in error.reason


def test_negative_budget_fails_the_schema_at_its_line():
    error = refused(policy_text(routes="""
      - name: default
        difficulty: easy
        strategies: [single_pass]
        budget: {max_tokens: -5, max_branches: 1}
    """))
    assert error.rule == "routes default" and "schema" in error.reason and error.line == 8


def test_a_routes_worth_per_success_reaches_its_decision_and_must_be_positive():
    policy = parse_policy(policy_text(routes="""
      - name: default
        difficulty: easy
        strategies: [best_of_n, beam]
        budget: {max_tokens: 900, max_branches: 8, max_tokens_per_success: 1500}
    """), "t.yaml")
    assert decide(policy, sample_view("t", {"problem": "hi"})).max_tokens_per_success == 1500
    unset = parse_policy(policy_text(), "t.yaml")
    assert decide(unset, sample_view("t", {"problem": "hi"})).max_tokens_per_success == 0
    for bad in ("0", "-3", "'lots'", "1.5"):
        error = refused(policy_text(routes=f"""
          - name: default
            difficulty: easy
            strategies: [best_of_n]
            budget: {{max_tokens: 900, max_branches: 8, max_tokens_per_success: {bad}}}
        """))
        assert error.rule == "routes default" and "max_tokens_per_success" in error.reason and error.line == 8, error


def test_failing_file_test_refuses_the_file():
    error = refused(policy_text(extra="""
        tests:
          - name: wrong expectation
            request: {problem: "x", task: {kind: arithmetic}}
            expect: {route: default}
    """))
    assert error.rule == "test wrong expectation" and "expected 'default', got 'maths'" in error.reason


def test_runtime_errors_fail_closed_by_default():
    """An escalation rule that errors counts as matched; a route that errors is skipped."""
    policy = parse_policy(policy_text(extra="""
        escalate:
          - name: big-refund
            when: double(request.evidence["amount"]) > 100.0
            reason: big refunds need a person
    """), "t.yaml")
    decision = decide(policy, sample_view("t", {"problem": "refund", "evidence": {"amount": "lots"}}))
    assert decision.escalate and decision.errors and "matched" in decision.errors[0]



def test_a_decision_is_remembered_for_requests_that_agree_on_what_the_policy_reads():
    policy = parse_policy(policy_text(), "t.yaml")
    assert policy_reads(policy) == (("high_impact",), ("task", "kind"))
    cache = DecisionCache()
    first = cache.decide(policy, sample_view("t", {"problem": "2+2", "task": {"kind": "arithmetic"}}))
    # Another problem and evidence, the same kind: nothing the policy reads differs.
    again = cache.decide(policy, sample_view("t", {"problem": "9*9", "task": {"kind": "arithmetic"}, "evidence": {"a": "b"}}))
    assert again is first and cache.hits == 1
    other = cache.decide(policy, sample_view("t", {"problem": "2+2", "task": {"kind": "chat"}}))
    assert (first.route, other.route, cache.hits) == ("maths", "default", 1)
    # A new revision of the file is decided afresh.
    changed = parse_policy(policy_text().replace("max_tokens: 500", "max_tokens: 400"), "t.yaml")
    assert changed.revision != policy.revision
    assert cache.decide(changed, sample_view("t", {"task": {"kind": "arithmetic"}})).budget.max_tokens == 400


def test_long_read_parts_are_decided_afresh_and_the_cache_is_bounded():
    policy = parse_policy(policy_text(routes=guarded("refunds", 'request.problem.contains("refund")')), "t.yaml")
    assert policy_reads(policy) == (("high_impact",), ("problem",))
    cache = DecisionCache(size=2)
    long_problem = "refund " + "x" * 5000
    assert cache.decide(policy, sample_view("t", {"problem": long_problem})).route == "refunds"
    assert cache.decide(policy, sample_view("t", {"problem": long_problem})).route == "refunds"
    assert cache.hits == 0
    for problem in ("a refund", "hello", "refund me", "hello"):
        cache.decide(policy, sample_view("t", {"problem": problem}))
    assert cache.hits == 1 and len(cache._decisions) == 2


CACHED_POLICY_VARIABLES = """
variables:
  - name: big
    expression: request.problem_chars > 20 || request.high_impact
"""
CACHED_POLICY_ROUTES = """
- name: carrier
  when: variables.big && "carrier" in request.evidence_keys
  difficulty: hard
  strategies: [beam]
  budget: {max_tokens: 900, max_branches: 8}
- name: checked
  when: request.task.checks.exists(c, c.name == "regex") && request.evidence["n"] == "1"
  difficulty: medium
  strategies: [best_of_n]
  budget: {max_tokens: 500, max_branches: 4}""" + DEFAULT_ROUTES
CACHED_POLICY_EXTRA = """
evidence:
  - name: needs-order
    when: request.task.kind == "refund"
    require: [order]
escalate:
  - name: amount
    when: int(request.evidence["amount"]) > 100
    reason: large amounts need a person
"""


@functools.cache
def cached_policy():
    return parse_policy(policy_text(routes=CACHED_POLICY_ROUTES, extra=CACHED_POLICY_EXTRA, variables=CACHED_POLICY_VARIABLES), "t.yaml")


@settings(max_examples=examples(200), deadline=None)
@given(
    requests=st.lists(
        st.fixed_dictionaries({
            "problem": st.text(alphabet="ab ", max_size=30),
            "task": st.fixed_dictionaries({
                "kind": st.sampled_from(["refund", "arithmetic", ""]),
                "checks": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["arithmetic", "regex"]), "params": st.just({})}), max_size=2),
            }),
            "evidence": st.dictionaries(st.sampled_from(["n", "carrier", "amount", "order"]), st.sampled_from(["1", "2", "150", "x"])),
            "high_impact": st.booleans(),
        }),
        min_size=1, max_size=6,
    )
)
def test_a_cached_decision_is_the_decision(requests):
    policy = cached_policy()
    assert policy_reads(policy) == (("evidence",), ("evidence_keys",), ("high_impact",), ("problem_chars",), ("task", "checks"), ("task", "kind"))
    cache = DecisionCache(size=3)
    for request in requests * 2:
        view = sample_view("t", request)
        assert cache.decide(policy, view) == decide(policy, view)

def test_variables_are_lazy_and_memoised():
    policy = parse_policy(policy_text(variables="""
        variables:
          - name: slow
            expression: size(request.problem) > 3
    """, routes=guarded("uses-it", "variables.slow && variables.slow")), "t.yaml")
    assert decide(policy, sample_view("t", {"problem": "long enough"})).route == "uses-it"
    assert policy.routes[0].when.variables == ("slow",)


def test_policy_cli_lint_and_test_pass_on_the_shipped_tenants():
    rmesh = str(pathlib.Path(sys.executable).parent / "rmesh")
    for command in ("lint", "test"):
        result = subprocess.run([rmesh, "policy", command, "policy/tenants"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "coverage 7/7 rules" in result.stdout
    assert sum(1 for line in result.stdout.splitlines() if line.startswith("policy/tenants/")) == 3


def test_policy_cli_exits_non_zero_on_a_broken_file(tmp_path):
    (tmp_path / "bad.yaml").write_text(policy_text().replace("strategies: [best_of_n]", "strategies: [warp_drive]"))
    rmesh = str(pathlib.Path(sys.executable).parent / "rmesh")
    result = subprocess.run([rmesh, "policy", "lint", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "bad.yaml:" in result.stdout and "warp_drive" in result.stdout


# -- quotas --------------------------------------------------------------------------------------


async def test_concurrent_requests_never_overspend_the_token_quota():
    """Fifty concurrent requests against a quota of 1000 tokens: reservations hold the line."""
    admission = Admission()
    quotas = Quotas(max_concurrent=100, tokens_per_window=1000, window_seconds=60)
    admitted, refused_count, spent = 0, 0, []

    async def one() -> None:
        nonlocal admitted, refused_count
        try:
            async with admission.admit("t", quotas, 300) as record:
                admitted += 1
                await asyncio.sleep(0.01)
                record(250)
                spent.append(250)
        except ResourceExhausted as exc:
            refused_count += 1
            assert exc.violations[0].subject == "tenant:t:tokens_per_window"

    await asyncio.gather(*(one() for _ in range(50)))
    assert admitted == 3 and refused_count == 47  # 3 x 300 reserved fits in 1000; a 4th would not
    assert sum(spent) <= quotas.tokens_per_window
    ledger = admission.ledger("t")
    assert ledger.reserved == 0 and ledger.active == 0
    assert ledger.used(0, 1e9) == 750  # reconciled to what was really used


async def test_concurrency_cap():
    admission = Admission()
    quotas = Quotas(max_concurrent=1, tokens_per_window=10_000)
    async with admission.admit("t", quotas, 10):
        with pytest.raises(ResourceExhausted) as info:
            async with admission.admit("t", quotas, 10):
                pass
    assert info.value.violations[0].subject == "tenant:t:concurrent_solves"


# -- the router with the policy --------------------------------------------------------------------


def demo_request(**overrides) -> router_pb2.SolveRequest:
    doc = yaml.safe_load((ROOT / "examples" / "fulfillment.yaml").read_text())
    doc.update(overrides)
    return json_format.ParseDict(doc, router_pb2.SolveRequest())


async def stream(address: str, request, key: str = "demo-key"):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return [e async for e in stub.Solve(request, metadata=[("authorization", f"Bearer {key}")], timeout=120)]


async def test_config_event_names_the_route_why_and_revision(mesh):
    events = await stream(mesh.address("router"), demo_request())
    config = events[1].config
    assert config.reason.startswith("route 'support' (easy)") and "support-ticket" in config.reason
    assert config.policy_revision == mesh.services["router"].policies.snapshot.policies["demo"].revision


async def test_high_impact_unverifiable_request_is_drafted_within_budget_then_escalated(mesh):
    """The escalation rule matches, but a reviewer needs something to approve: the route's search
    runs first, and the review holds its draft."""
    jobs = mesh.engine.stats.jobs_started
    events = await stream(mesh.address("router"), router_pb2.SolveRequest(problem="Approve a refund of 900?", high_impact=True))
    outcome = events[-1].outcome
    assert outcome.kind == router_pb2.OUTCOME_KIND_ESCALATED and not outcome.released and not outcome.answer
    assert outcome.next_step == "await_human_review" and "high impact" in outcome.reason
    assert outcome.review_id and outcome.assurance == router_pb2.ASSURANCE_UNSPECIFIED
    assert mesh.engine.stats.jobs_started > jobs and 0 < outcome.usage.completion_tokens <= 1200
    review = mesh.services["router"].reviews.get("demo", outcome.review_id)
    assert review.caller == "demo-caller" and review.draft["strategy"] == outcome.strategy
    assert review.draft["usage"][1] == outcome.usage.completion_tokens


async def test_reviewer_key_cannot_call_solve(mesh):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream(mesh.address("router"), demo_request(), key="demo-reviewer-key")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_broken_file_during_traffic_keeps_the_last_good_policy(mesh, tmp_path):
    """Replace a tenant file with a broken one while requests flow: none fails, the old revision
    keeps deciding, and the policy health entry turns NOT_SERVING until the file is fixed."""
    tenants = tmp_path / "tenants"
    shutil.copytree(ROOT / "policy" / "tenants", tenants)
    policies = PolicyStore(tenants)
    good = policies.snapshot.policies["demo"].revision
    router = await start_router(
        "127.0.0.1:0", SETTINGS, tracer_provider("r", {}), mesh.address("solver"), mesh.address("verifier"),
        policies, reload_interval=0.1,
    )
    address = f"127.0.0.1:{router.port}"
    missing = demo_request()
    del missing.evidence.fields["carrier"]  # answered without a model call: quick traffic
    try:
        async def traffic() -> list:
            return [await stream(address, missing) for _ in range(10)]

        flowing = asyncio.create_task(traffic())
        demo = tenants / "demo.yaml"
        original = demo.read_text()
        demo.write_text(original.replace("routes:", "routes: [broken"))
        results = await flowing
        assert all(r[-1].outcome.missing_evidence == ["carrier"] for r in results)
        await asyncio.sleep(0.4)
        assert not policies.status.ok and "demo.yaml" in policies.status.errors[0]
        assert policies.snapshot.policies["demo"].revision == good
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=POLICY_HEALTH), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Metrics are per process and other routers of this test session share them: the
            # error count is what only this broken file moves.
            errors = REGISTRY.get_sample_value("rmesh_policy_reloads_total", {"result": "error"})
            assert errors >= 1
            main = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            assert main.status == health_pb2.HealthCheckResponse.SERVING
            demo.write_text(original.replace("tokens_per_window: 200000", "tokens_per_window: 150000"))
            await asyncio.sleep(0.4)
            assert policies.status.ok and policies.snapshot.policies["demo"].revision != good
            reply = await health.Check(health_pb2.HealthCheckRequest(service=POLICY_HEALTH), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            settled = REGISTRY.get_sample_value("rmesh_policy_reloads_total", {"result": "error"})
            await asyncio.sleep(0.3)
            assert REGISTRY.get_sample_value("rmesh_policy_reloads_total", {"result": "error"}) == settled
    finally:
        await router.stop(1)


async def test_over_quota_is_resource_exhausted_with_a_quota_detail(mesh, tmp_path):
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    text = (ROOT / "policy" / "tenants" / "demo.yaml").read_text().replace("tokens_per_window: 200000", "tokens_per_window: 1000")
    (tenants / "demo.yaml").write_text(text)
    router = await start_router(
        "127.0.0.1:0", SETTINGS, tracer_provider("r", {}), mesh.address("solver"), mesh.address("verifier"),
        PolicyStore(tenants), reload_interval=0,
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream(f"127.0.0.1:{router.port}", demo_request())
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        detail = error_details_pb2.QuotaFailure()
        assert rpc_status.from_call(info.value).details[0].Unpack(detail)
        assert detail.violations[0].subject == "tenant:demo:tokens_per_window"
    finally:
        await router.stop(1)
