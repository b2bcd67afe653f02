"""Name → strategy registry. Every strategy has the signature ``run(*, state) -> SolveResult``;
policy refers to strategies by these names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from rmesh.solving import SolveResult
from rmesh.solver_svc.strategies import beam, best_of_n, mcts, self_consistency, single_pass, single_path

Strategy = Callable[..., Awaitable[SolveResult]]

REGISTRY: dict[str, Strategy] = {
    m.NAME: m.run for m in (single_pass, single_path, best_of_n, self_consistency, beam, mcts)
}
# Strategies that grow answers step by step (their budget counts steps per branch).
TREE_STRATEGIES = frozenset({single_path.NAME, beam.NAME, mcts.NAME})

__all__ = ["REGISTRY", "TREE_STRATEGIES", "Strategy"]
