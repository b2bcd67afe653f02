"""``single_path``: one greedy path built checkpoint by checkpoint, verified after each step.

Each step is its own engine call on the growing prefix, so a step that breaks an exact rule
(an equation that does not hold, a number the evidence lacks) ends the path early instead of
spending tokens on a conclusion built on it.
"""

from __future__ import annotations

from rmesh.solving import (
    STOP_COMPLETED,
    STOP_DEPTH_CAP,
    STOP_EXACT_CHECK_PASSED,
    SolveResult,
)
from rmesh.solver_svc.search import SearchState

NAME = "single_path"
INVALID_STEP = 0.0


async def run(*, state: SearchState) -> SolveResult:
    parent = None
    max_depth = state.request.budget.max_depth
    for depth in range(max_depth):
        if stop := state.stop_before_round(1):
            return state.result(NAME, stop)
        children = await state.expand([parent], n=1, temperature=0.0, stage="step", step=True)
        if not children:
            return state.result(NAME, STOP_COMPLETED)
        node = children[0]
        if node.verdict.release:
            return state.result(NAME, STOP_EXACT_CHECK_PASSED)
        if node.finished:
            # At the depth cap the grammar only allows finishing: the cap decided the end.
            return state.result(NAME, STOP_DEPTH_CAP if depth + 1 >= max_depth else STOP_COMPLETED)
        if node.verdict.step_scores and node.verdict.step_scores[-1] == INVALID_STEP:
            return state.result(NAME, "invalid_step")
        parent = node
    return state.result(NAME, STOP_DEPTH_CAP)
