"""``beam``: Tree of Thoughts as beam search over checkpoints.

Each round expands every live node into ``branching_factor`` children (one engine call, the
nodes' shared prefix evaluated once), scores the partial states with the verifier (exact step
checks, citations), prunes those below ``prune_below`` and repeated states, and keeps the best
``beam_width``. Finished children join the candidate pool; the first eligible one ends the
search.
"""

from __future__ import annotations

from rmesh.solving import (
    STOP_COMPLETED,
    STOP_DEPTH_CAP,
    STOP_EXACT_CHECK_PASSED,
    STOP_NO_IMPROVEMENT,
    STOP_REPEATED_STATE,
    SolveResult,
)
from rmesh.solver_svc.search import Node, SearchState

NAME = "beam"
TEMPERATURE = 0.8


def make_pruner(state: SearchState, keep: int):
    threshold = state.request.search.prune_below

    def prune(children: list[Node]) -> dict[str, str]:
        reasons = {n.id: "below_threshold" for n in children if not n.finished and n.score < threshold}
        open_nodes = sorted(
            (n for n in children if not n.finished and n.id not in reasons), key=lambda n: n.rank, reverse=True
        )
        reasons.update({n.id: "outside_beam" for n in open_nodes[keep:]})
        return reasons

    return prune


async def run(*, state: SearchState) -> SolveResult:
    search, budget = state.request.search, state.request.budget
    width = max(1, search.beam_width)
    factor = max(1, search.branching_factor)
    frontier: list[Node | None] = [None]
    for depth in range(budget.max_depth):
        # A forced step (the verbatim citation of the next required key) has one outcome.
        n = 1 if state.forced_step(frontier[0]) else factor
        frontier = frontier[: max(1, state.live_cap // n)]
        if stop := state.stop_before_round(len(frontier) * n):
            return state.result(NAME, stop)
        pruned_before = state.branches_pruned
        children = await state.expand(
            frontier,
            n=n,
            temperature=state.temperature(TEMPERATURE),
            stage=f"depth {depth + 1}",
            step=True,
            prune=make_pruner(state, width),
        )
        if state.eligible():
            return state.result(NAME, STOP_EXACT_CHECK_PASSED)
        frontier = [node for node in children if not node.finished]
        if not frontier:
            if depth + 1 >= budget.max_depth:
                return state.result(NAME, STOP_DEPTH_CAP)
            if not children and state.branches_pruned > pruned_before:
                return state.result(NAME, STOP_REPEATED_STATE)
            return state.result(NAME, STOP_COMPLETED)
        if state.stalled():
            return state.result(NAME, STOP_NO_IMPROVEMENT)
    return state.result(NAME, STOP_DEPTH_CAP)
