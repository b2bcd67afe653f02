"""Proto ⇄ domain conversion keeps every field: a field added to one side and forgotten on the
other fails here."""

from __future__ import annotations

import dataclasses

from rmesh import convert
from rmesh.domain import Budget, Candidate, Checkpoint, CheckResult, CheckSpec, SearchParams, TaskSpec, Usage, Verdict
from rmesh.solving import Progress, SolveRequest, SolveResult


def test_budget_search_usage_round_trip():
    budget = Budget(11, 12, 13, 14.5, 15, 16)
    search = SearchParams(3, 4, 5, 0.25, 2.5, 6, 0.7, "process", "prod", True)
    usage = Usage(1, 2, 3)
    assert convert.budget_from_proto(convert.budget_to_proto(budget)) == budget
    assert convert.search_from_proto(convert.search_to_proto(search)) == search
    assert convert.search_from_proto(convert.search_to_proto(SearchParams())) == SearchParams()
    assert convert.usage_from_proto(convert.usage_to_proto(usage)) == usage
    assert {f.name for f in dataclasses.fields(Budget)} <= set(convert.budget_to_proto(budget).DESCRIPTOR.fields_by_name)


def test_solve_request_progress_result_round_trip():
    request = SolveRequest(
        problem="p", task=TaskSpec("k", (CheckSpec("arithmetic", {"expression": "1 + 1"}),)), evidence={"a": "b"},
        strategy="beam", budget=Budget(1, 2, 3, 4.0, 5, 6), required_evidence=("a",), tenant="t", seed=9,
        search=SearchParams(samples=2, temperature=0.0),
    )
    assert convert.solve_request_from_proto(convert.solve_request_to_proto(request)) == request
    progress = Progress("s", 1, 2, Usage(3, 4, 5), 1, 2, 3, 0.5, 1, "token_cap")
    assert convert.progress_from_proto(convert.progress_to_proto(progress)) == progress
    verdict = Verdict(True, ("m",), ("u",), ("r",), ("7",), (1.0, 0.0), 0.6, (0.5,), (CheckResult("x", True, "ok"),), "next", 0.9)
    candidate = Candidate("b1", (Checkpoint("t", ("a",)),), "sum", "ans", True)
    result = SolveResult(candidate, verdict, Usage(1, 2, 3), "completed", 4, True, "beam", 0.5, 2, 100)
    assert convert.result_from_proto(convert.result_to_proto(result)) == result
