"""``mcts``: Monte Carlo tree search over checkpoints with PUCT selection.

Selection descends by ``Q + c · P · sqrt(N_parent) / (1 + N_child)``: Q is the mean verifier
score below a node, P the prior of the step that made it — the engine's log-probability of
that step, length-normalised and softmaxed among its siblings — and c the configurable
exploration constant. Each round expands one leaf into ``branching_factor`` children (one
engine call), scores them with the verifier and backs the best child's score up the path.
"""

from __future__ import annotations

import math

from rmesh.solving import (
    STOP_COMPLETED,
    STOP_EXACT_CHECK_PASSED,
    STOP_NO_IMPROVEMENT,
    SolveResult,
)
from rmesh.solver_svc.search import Node, SearchState

NAME = "mcts"
TEMPERATURE = 0.9


def puct(parent_visits: int, child: Node, exploration: float) -> float:
    q = child.value_sum / child.visits if child.visits else 0.0
    return q + exploration * child.prior * math.sqrt(parent_visits) / (1 + child.visits)


def set_priors(children: list[Node]) -> None:
    """Softmax over siblings of each step's mean log-probability over the tokens the model chose.

    Tokens a grammar forced carry no preference (SGLang reports them as log-probability 0):
    they are left out of the mean, and a step made only of forced tokens gets the siblings'
    average instead of the highest prior."""
    if not children:
        return

    def mean(c: Node) -> float | None:
        chosen = c.logprob_tokens if c.logprob_tokens is not None else c.tokens - (c.parent.tokens if c.parent else 0)
        return c.logprob / chosen if chosen > 0 else None

    raw = [mean(c) for c in children]
    known = [m for m in raw if m is not None]
    neutral = sum(known) / len(known) if known else 0.0
    means = [neutral if m is None else m for m in raw]
    top = max(means)
    weights = [math.exp(m - top) for m in means]
    total = sum(weights)
    for child, weight in zip(children, weights):
        child.prior = weight / total


def select(roots: list[Node], root_visits: int, exploration: float) -> Node | None:
    """Descend from the root's children to an unexpanded, unfinished leaf."""
    candidates, visits = roots, root_visits
    while candidates:
        open_nodes = [c for c in candidates if not (c.finished and not c.children)]
        if not open_nodes:
            return None
        node = max(open_nodes, key=lambda c: puct(visits, c, exploration))
        if not node.children:
            return None if node.finished else node
        candidates, visits = node.children, node.visits
    return None


def backpropagate(node: Node | None, value: float) -> None:
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


async def run(*, state: SearchState) -> SolveResult:
    search, budget = state.request.search, state.request.budget
    factor = max(1, min(search.branching_factor, state.live_cap))
    temperature = state.temperature(TEMPERATURE)
    roots = await state.expand(
        [None], n=1 if state.forced_step(None) else factor, temperature=temperature, stage="root", step=True, logprobs=True
    )
    set_priors(roots)
    root_visits = 0
    for node in roots:
        backpropagate(node, node.score)
        root_visits += 1
    while not state.eligible():
        leaf = select(roots, root_visits, search.exploration)
        if leaf is None:
            return state.result(NAME, STOP_COMPLETED)
        n = 1 if state.forced_step(leaf) else factor
        if stop := state.stop_before_round(n):
            return state.result(NAME, stop)
        if leaf.depth >= budget.max_depth:
            backpropagate(leaf, leaf.score)
            root_visits += 1
            continue
        children = await state.expand(
            [leaf], n=n, temperature=temperature, stage=f"simulation {root_visits}", step=True, logprobs=True
        )
        set_priors(children)
        value = max((c.score for c in children), default=0.0)
        for child in children:
            child.visits, child.value_sum = 1, child.score
        backpropagate(leaf, value)
        root_visits += 1
        if state.stalled():
            return state.result(NAME, STOP_NO_IMPROVEMENT)
    return state.result(NAME, STOP_EXACT_CHECK_PASSED)
