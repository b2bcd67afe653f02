"""``single_pass``: one greedy answer, the cheapest rung; the verifier still gates it."""

from __future__ import annotations

from rmesh.solving import STOP_COMPLETED, STOP_EXACT_CHECK_PASSED, SolveResult
from rmesh.solver_svc.search import SearchState

NAME = "single_pass"


async def run(*, state: SearchState) -> SolveResult:
    (node,) = await state.expand([None], n=1, temperature=0.0, stage="single_pass", step=False)
    return state.result(NAME, STOP_EXACT_CHECK_PASSED if node.verdict.release else STOP_COMPLETED)
