"""Exact checkers: each judges its answers, validates its parameters, and never raises on any answer."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fuzzing import examples

from rmesh.api.verifier.v1 import verifier_pb2, verifier_pb2_grpc
from rmesh.domain import CheckResult
from rmesh.errors import InvalidRequest
from rmesh.verifier_svc.checkers import REGISTRY
from rmesh.verifier_svc.checkers.json_schema import JsonSchemaChecker

VALID_PARAMS = {
    "arithmetic": {"expression": "6 * 7 - 5"},
    "expression_target": {"numbers": [9, 2, 3], "target": 21},
    "json_schema": {"schema": {"type": "object", "required": ["eta"], "properties": {"eta": {"type": "string"}}}},
    "regex": {"pattern": r"ETA: \d{4}-\d{2}-\d{2}"},
    "route_constraints": {"start": "A", "end": "C", "blocked": [["B", "C"]]},
    "python_tests": {"tests": "assert add(2, 3) == 5"},
}


def judge(name: str, answer: str, params: dict | None = None) -> CheckResult:
    checker = REGISTRY[name]
    return checker.check(answer, checker.prepare(params or VALID_PARAMS[name], "p"))


def test_every_registered_checker_has_valid_params_here():
    assert set(VALID_PARAMS) == set(REGISTRY)


@pytest.mark.parametrize(
    ("answer", "passed"),
    [('{"eta": "tomorrow"}', True), ('{"eta": 3}', False), ('{"when": "x"}', False), ("tomorrow", False)],
)
def test_json_schema(answer, passed):
    assert judge("json_schema", answer).passed is passed


def test_json_schema_refuses_an_invalid_schema():
    with pytest.raises(InvalidRequest) as info:
        REGISTRY["json_schema"].prepare({"schema": {"type": "no-such-type"}}, "task.checks[0].params")
    assert info.value.field == "task.checks[0].params.schema"


@pytest.mark.parametrize(("answer", "passed"), [("ETA: 2026-12-01", True), ("ETA: tomorrow", False), ("x ETA: 2026-12-01", False)])
def test_regex_matches_the_whole_answer(answer, passed):
    assert judge("regex", answer).passed is passed


@pytest.mark.timeout(10)
def test_regex_that_would_backtrack_catastrophically_finishes():
    """(a+)+$ against a long run of a's and a b: exponential for a backtracking engine, linear on RE2."""
    result = judge("regex", "a" * 50_000 + "b", {"pattern": "(a+)+$"})
    assert result.passed is False


@pytest.mark.parametrize("pattern", ["(a", r"(a)\1", "(?=a)b", ""])
def test_regex_refuses_patterns_re2_cannot_run(pattern):
    with pytest.raises(InvalidRequest) as info:
        REGISTRY["regex"].prepare({"pattern": pattern}, "p")
    assert info.value.field == "p.pattern"


@pytest.mark.parametrize(
    ("answer", "passed"),
    [("A -> B -> C", False), ("A -> D -> C", True), ("A, D, C", True), ("D -> C", False), ("A", False)],
)
def test_route_constraints_the_seed_bridge(answer, passed):
    """B-C is the blocked bridge: any route across it fails, whatever its other merits."""
    assert judge("route_constraints", answer).passed is passed


def test_route_constraints_with_an_edge_list():
    params = {"start": "A", "end": "C", "blocked": [], "edges": [["A", "B"], ["B", "C"]]}
    assert judge("route_constraints", "A-B-C", params).passed
    assert not judge("route_constraints", "A-C", params).passed


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"end": "C"}, "p.start"),
        ({"start": "A", "end": "C", "blocked": [["B"]]}, "p.blocked[0]"),
        ({"start": "A", "end": "C", "blocked": "B-C"}, "p.blocked"),
    ],
)
def test_route_constraints_params_are_validated(params, field):
    with pytest.raises(InvalidRequest) as info:
        REGISTRY["route_constraints"].prepare(params, "p")
    assert info.value.field == field


def test_python_tests_pass_and_fail_with_the_assertion():
    assert judge("python_tests", "def add(a, b):\n    return a + b").passed
    failed = judge("python_tests", "def add(a, b):\n    return a - b")
    assert not failed.passed and "AssertionError" in failed.detail


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("import os\nwhile True:\n    os.fork()", "os.fork is not allowed"),
        ("while True:\n    pass", "CPU time limit"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", "not allowed"),
        ("open('/tmp/rmesh-sandbox-escape', 'w').write('x')", "write outside its directory"),
        ("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)", "output larger than"),
        ("import ctypes\nctypes.CDLL(None).system(b'true')", "ctypes.dlopen is not allowed"),
        ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen is not allowed"),
    ],
)
def test_python_tests_sandbox_fails_hostile_code_with_a_reason(code, reason):
    result = judge("python_tests", code, {"tests": "pass"})
    assert not result.passed
    assert reason in result.detail, result.detail


def test_python_tests_refuses_tests_that_do_not_compile():
    with pytest.raises(InvalidRequest) as info:
        REGISTRY["python_tests"].prepare({"tests": "assert (("}, "p")
    assert info.value.field == "p.tests"


async def test_verifier_keeps_serving_while_the_sandbox_spins(mesh):
    """A CPU-bound candidate runs for seconds; health checks and other verifications still answer."""
    async with mesh.channel("verifier") as channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        slow = verifier_pb2.VerifyRequest()
        slow.task.checks.add(name="python_tests").params.update({"tests": "pass"})
        slow.candidates.add(id="spin", final_answer="while True: pass", well_formed=True).checkpoints.add(text="x")
        spinning = asyncio.ensure_future(stub.Verify(slow, timeout=30))
        await asyncio.sleep(0.3)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert not spinning.done(), spinning.result()
        reply = await spinning
        assert not reply.verdicts[0].release
        assert "CPU time limit" in reply.verdicts[0].checks[-1].detail


async def test_oversized_candidate_fields_are_invalid_argument(mesh):
    async with mesh.channel("verifier") as channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        request = verifier_pb2.VerifyRequest()
        request.candidates.add(id="ok", final_answer="1")
        request.candidates.add(id="big", final_answer="9" * 100_001)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Verify(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("candidates[1].final_answer:")


@pytest.mark.parametrize("name", sorted(VALID_PARAMS))
@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=st.text(max_size=300))
def test_no_answer_makes_a_checker_raise(name, answer):
    if name == "python_tests":
        answer = answer[:60]  # each example is a sandboxed process; keep them cheap
    result = judge(name, answer)
    assert isinstance(result, CheckResult) and result.name == name


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("name", sorted(VALID_PARAMS))
@settings(max_examples=examples(40), deadline=None)
@given(params=st.dictionaries(st.sampled_from(["expression", "numbers", "target", "schema", "pattern", "start", "end", "blocked", "edges", "tests"]), json_values, max_size=4))
def test_any_params_are_accepted_or_refused_by_name(name, params):
    """Whatever a caller sends as params, prepare either accepts it or raises InvalidRequest."""
    try:
        REGISTRY[name].prepare(params, "p")
    except InvalidRequest as exc:
        assert exc.field.startswith("p.")


def test_json_schema_patterns_run_in_linear_time():
    """A backtracking pattern in a caller's schema cannot stall the verifier: RE2 runs it."""
    checker = JsonSchemaChecker()
    prepared = checker.prepare({"schema": {"type": "string", "pattern": "^(a+)+$"}}, "task.checks[0].params")
    started = time.monotonic()
    result = checker.check(json.dumps("a" * 50_000 + "b"), prepared)
    assert not result.passed and "does not match" in result.detail
    assert time.monotonic() - started < 1.0  # Python's re would need longer than the universe
    keyed = checker.prepare({"schema": {"type": "object", "patternProperties": {"^n(a+)+$": {"type": "integer"}}}}, "p")
    assert checker.check('{"naaa": 3}', keyed).passed
    assert not checker.check('{"naaa": "x"}', keyed).passed
    with pytest.raises(InvalidRequest, match=r"task.checks\[0\].params.schema: pattern '\(\?<=a\)b' is not an RE2 pattern"):
        checker.prepare({"schema": {"properties": {"x": {"pattern": "(?<=a)b"}}}}, "task.checks[0].params")
