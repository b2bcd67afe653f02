"""Fuzzing with hypothesis: request validation (router and solver), the policy loader and the
verifier's task preparation. Whatever comes in is accepted or refused with the project's own
error naming a field; nothing else may escape (that would be INTERNAL at the edge). The example
counts are fixed here and multiplied by `make fuzz`."""

from __future__ import annotations

import math

import yaml
from fuzzing import examples
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmesh import convert
from rmesh.router_svc import convert as router_convert
from rmesh.api.router.v1 import router_pb2
from rmesh.api.solver.v1 import solver_pb2
from rmesh.errors import InvalidRequest
from rmesh.router_svc.policy.loader import PolicyError, parse_policy
from rmesh.router_svc.core import validate
from rmesh.solver_svc.core import validate as validate_solver
from rmesh.solver_svc.strategies import REGISTRY as STRATEGIES
from rmesh.verifier_svc.core import VerifierCore

CHECKERS = ["arithmetic", "expression_target", "json_schema", "regex", "route_constraints", "python_tests"]
json_leaf = st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**6, 10**6) | st.text(max_size=40)
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
# Text with the characters that break parsers: controls, surrogates excluded (protobuf refuses them
# before any of our code runs), template tags, quotes.
nasty_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200) | st.sampled_from(
    ["", " ", "<final_answer>", "</response>", "\x00", "\x1b[2J", "'; DROP TABLE reviews; --", "{{7*7}}", "a" * 9000]
)

check = st.fixed_dictionaries({"name": st.sampled_from(CHECKERS) | st.text(max_size=12), "params": st.dictionaries(
    st.sampled_from(["expression", "numbers", "target", "schema", "pattern", "use_all", "start", "end", "edges", "tests"]) | st.text(max_size=8),
    json_values, max_size=4,
)})
router_requests = st.fixed_dictionaries({
    "problem": nasty_text,
    "task": st.fixed_dictionaries({"kind": nasty_text, "checks": st.lists(check, max_size=4)}),
    "evidence": st.dictionaries(nasty_text, json_values, max_size=6),
    "high_impact": st.booleans(),
})


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=router_requests)
def test_router_validation_accepts_or_refuses_by_field(doc):
    message = json_format.ParseDict(doc, router_pb2.SolveRequest())
    request = router_convert.router_request_from_proto(message)
    try:
        evidence = validate(request)
    except InvalidRequest as exc:
        assert exc.field, "every refusal names a field"
        return
    assert all(isinstance(v, str) for v in evidence.values())
    try:
        VerifierCore().prepare(request.task)
    except InvalidRequest as exc:
        assert exc.field.startswith("task.checks")


budgets = st.fixed_dictionaries({
    "max_tokens": st.integers(-2**31, 2**31 - 1),
    "max_branches": st.integers(-2**31, 2**31 - 1),
    "max_depth": st.integers(-2**31, 2**31 - 1),
    "wall_clock_seconds": st.floats(allow_nan=True, allow_infinity=True),
    "max_tokens_per_branch": st.integers(-2**31, 2**31 - 1),
    "max_kv_bytes": st.integers(-2**63, 2**63 - 1),
})
searches = st.fixed_dictionaries({
    "samples": st.integers(-2**31, 2**31 - 1),
    "beam_width": st.integers(-2**31, 2**31 - 1),
    "branching_factor": st.integers(-2**31, 2**31 - 1),
    "prune_below": st.floats(allow_nan=True),
    "exploration": st.floats(allow_nan=True),
    "no_improvement_rounds": st.integers(-2**31, 2**31 - 1),
})


@settings(max_examples=examples(150), deadline=None)
@given(problem=nasty_text, strategy=st.sampled_from(sorted(STRATEGIES)) | st.text(max_size=12), budget=budgets, search=searches)
def test_solver_validation_accepts_or_refuses_by_field(problem, strategy, budget, search):
    message = solver_pb2.SolveRequest(problem=problem, strategy=strategy)
    for name, value in budget.items():
        setattr(message.budget, name, value)
    for name, value in search.items():
        setattr(message.search, name, value)
    request = convert.solve_request_from_proto(message)
    try:
        validate_solver(request, sorted(STRATEGIES))
    except InvalidRequest as exc:
        assert exc.field
        return
    b = request.budget
    assert b.max_tokens > 0 and b.max_branches > 0 and math.isfinite(b.wall_clock_seconds) and b.wall_clock_seconds > 0


GOOD = {
    "tenant": "fuzz",
    "api_keys": [{"name": "k", "sha256": "0" * 64, "role": "caller"}],
    "routes": [{"name": "all", "difficulty": "easy", "strategies": ["single_pass"],
                "budget": {"max_tokens": 100, "max_branches": 2, "max_depth": 2, "wall_clock_seconds": 10, "max_tokens_per_branch": 50}}],
}
cel = st.sampled_from([
    "request.problem.size() > 3", "problem_chars > 10", "task.kind == 'x'", "evidence_keys.exists(k, k == 'a')",
    "high_impact && size(task.checks) > 0", "variables.v", "1 / 0 == 1", "request.nope", "frobnicate(1)",
    "'a' + 1", "true", "[1, 2", "task.checks.all(c, c.name.startsWith('a'))", "",
]) | st.text(max_size=40)


def _mutations():
    return st.one_of(
        st.fixed_dictionaries({"routes": st.just([{"name": "r", "when": None, "difficulty": "easy", "strategies": ["x"], "budget": {}}])}),
        st.fixed_dictionaries({"variables": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["v", "w", ""]), "expression": cel}), max_size=3)}),
        st.fixed_dictionaries({"escalate": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5), "when": cel, "reason": st.text(max_size=10)}), max_size=2)}),
        st.fixed_dictionaries({"evidence": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5), "when": cel, "require": st.lists(st.text(max_size=5), max_size=2)}), max_size=2)}),
        st.fixed_dictionaries({"quotas": st.dictionaries(st.sampled_from(["max_concurrent", "tokens_per_window", "window_seconds", "x"]), json_values, max_size=3)}),
        st.fixed_dictionaries({"tenant": json_values, "api_keys": json_values}),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    )


@settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=_mutations(), route_when=cel)
def test_policy_loader_loads_or_refuses_with_file_line_and_rule(mutation, route_when):
    doc = {**GOOD, **mutation}
    if isinstance(doc.get("routes"), list) and doc["routes"] and doc["routes"] is not GOOD["routes"]:
        pass
    else:
        doc["routes"] = [{**GOOD["routes"][0], "name": "first", "when": route_when}, GOOD["routes"][0]]
    text = yaml.safe_dump(doc, allow_unicode=True)
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as exc:
        assert exc.message.startswith("fuzz.yaml")


@settings(max_examples=examples(60), deadline=None)
@given(text=st.text(max_size=400))
def test_policy_loader_survives_arbitrary_text(text):
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as exc:
        assert exc.message.startswith("fuzz.yaml")


def test_atheris_finds_no_crash_in_the_checkers(tmp_path):
    """The coverage-guided harness (fuzz/checkers.py) for a fixed number of runs; `make fuzz`
    runs it for a million."""
    import pathlib
    import subprocess
    import sys

    harness = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "checkers.py"
    done = subprocess.run(
        [sys.executable, str(harness), f"-runs={examples(3000)}", "-max_len=512", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Done {examples(3000)} runs" in done.stderr
    assert not list(tmp_path.glob("crash-*"))
