"""``best_of_n``: N whole answers from one shared prefix; the verifier picks the best eligible.

The first branch is greedy so Best-of-N never does worse than a single pass; the other N-1
sample in batches that double (2, 4, 8, ... up to the live-branch cap): an easy task stops after
a few samples, a hard one still gets wide batches. The search stops as soon as an answer passes
every check, so no sample is drawn after the first exact pass's batch.
"""

from __future__ import annotations

from rmesh.solving import STOP_COMPLETED, STOP_EXACT_CHECK_PASSED, SolveResult
from rmesh.solver_svc.search import SearchState

NAME = "best_of_n"
TEMPERATURE = 0.9


async def run(*, state: SearchState) -> SolveResult:
    n = state.samples()
    remaining = n
    if not state.request.search.skip_greedy:
        greedy = await state.expand([None], n=1, temperature=0.0, stage="greedy", step=False)
        if any(node.verdict.release for node in greedy):
            return state.result(NAME, STOP_EXACT_CHECK_PASSED)
        remaining = n - 1
    width = 2
    while remaining > 0:
        batch = min(remaining, state.live_cap, width)
        width *= 2
        if stop := state.stop_before_round(batch):
            return state.result(NAME, stop)
        sampled = await state.expand([None], n=batch, temperature=state.temperature(TEMPERATURE), stage="sampled", step=False)
        remaining -= batch
        if any(node.verdict.release for node in sampled):
            return state.result(NAME, STOP_EXACT_CHECK_PASSED)
    return state.result(NAME, STOP_COMPLETED)
