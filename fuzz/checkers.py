"""Coverage-guided fuzzing of the exact checkers with atheris: whatever bytes come in, a checker's prepare accepts the params or raises
InvalidRequest, and check returns a CheckResult; anything else is a crash atheris reports.

    python fuzz/checkers.py -runs=200000        # make fuzz
    python fuzz/checkers.py -runs=3000          # the smoke run inside make test

The sandboxed python_tests checker is left to the hypothesis tests: one process per input is
too slow for coverage-guided fuzzing.
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from rmesh.domain import CheckResult
    from rmesh.errors import InvalidRequest
    from rmesh.verifier_svc.checkers import arithmetic, expression_target, json_schema, regex, route_constraints

CHECKERS = [
    arithmetic.ArithmeticChecker(),
    expression_target.ExpressionTargetChecker(),
    json_schema.JsonSchemaChecker(),
    regex.RegexChecker(),
    route_constraints.RouteConstraintsChecker(),
]
PARAM_KEYS = ["expression", "numbers", "target", "use_all", "schema", "pattern", "start", "end", "blocked", "edges", "required"]


def _value(data: atheris.FuzzedDataProvider, depth: int = 0):
    kind = data.ConsumeIntInRange(0, 6 if depth < 3 else 4)
    if kind == 0:
        return data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 40))
    if kind == 1:
        return data.ConsumeIntInRange(-10**6, 10**6)
    if kind == 2:
        return data.ConsumeRegularFloat()
    if kind == 3:
        return data.ConsumeBool()
    if kind == 4:
        return None
    if kind == 5:
        return [_value(data, depth + 1) for _ in range(data.ConsumeIntInRange(0, 4))]
    return {data.PickValueInList(PARAM_KEYS + ["type", "properties"]): _value(data, depth + 1) for _ in range(data.ConsumeIntInRange(0, 3))}


def one_input(raw: bytes) -> None:
    data = atheris.FuzzedDataProvider(raw)
    checker = data.PickValueInList(CHECKERS)
    params = {data.PickValueInList(PARAM_KEYS): _value(data) for _ in range(data.ConsumeIntInRange(0, 4))}
    if data.ConsumeBool() and checker.name == "json_schema":
        params["schema"] = json.loads(json.dumps(params.get("schema", {"type": "object"}), default=str))
    answer = data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 300))
    try:
        prepared = checker.prepare(params, "task.checks[0].params")
    except InvalidRequest as exc:
        assert exc.field.startswith("task.checks[0].params"), exc.field
        return
    result = checker.check(answer, prepared)
    assert isinstance(result, CheckResult) and isinstance(result.passed, bool)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
