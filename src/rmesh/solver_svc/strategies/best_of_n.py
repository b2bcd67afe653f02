"""``best_of_n``: N branches from one shared prefix, the verifier picks the best eligible one.

The first branch is greedy so Best-of-N never does worse than a single path; the rest sample.
When a round's best already passes every check the search stops (over-thinking costs tokens).
"""

from __future__ import annotations

from rmesh.solver_svc.model import (
    STOP_BUDGET_EXHAUSTED,
    STOP_COMPLETED,
    STOP_EXACT_CHECK_PASSED,
    SolveResult,
)
from rmesh.solver_svc.search import SearchState

NAME = "best_of_n"
TEMPERATURE = 0.9


async def run(*, state: SearchState) -> SolveResult:
    budget = state.request.budget
    n = max(1, budget.max_branches)
    greedy = await state.round(n=1, temperature=0.0, stage="greedy")
    if greedy[0].verdict.release:
        return state.result(NAME, STOP_EXACT_CHECK_PASSED)
    if n == 1:
        return state.result(NAME, STOP_COMPLETED)
    if state.tokens_left < n - 1:
        return state.result(NAME, STOP_BUDGET_EXHAUSTED)
    sampled = await state.round(n=n - 1, temperature=TEMPERATURE, stage="sampled")
    if any(s.verdict.release for s in sampled):
        return state.result(NAME, STOP_EXACT_CHECK_PASSED)
    return state.result(NAME, STOP_COMPLETED)
