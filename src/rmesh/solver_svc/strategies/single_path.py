"""``single_path``: one low-temperature attempt in the checkpointed template."""

from __future__ import annotations

from rmesh.solver_svc.model import STOP_COMPLETED, STOP_EXACT_CHECK_PASSED, SolveResult
from rmesh.solver_svc.search import SearchState

NAME = "single_path"


async def run(*, state: SearchState) -> SolveResult:
    scored = await state.round(n=1, temperature=0.0, stage="single_path")
    stop = STOP_EXACT_CHECK_PASSED if scored[0].verdict.release else STOP_COMPLETED
    return state.result(NAME, stop)
