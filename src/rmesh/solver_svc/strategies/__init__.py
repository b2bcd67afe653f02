"""Name → strategy registry. Every strategy has the signature ``run(*, state) -> SolveResult``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from rmesh.solver_svc.model import SolveResult
from rmesh.solver_svc.search import SearchState
from rmesh.solver_svc.strategies import best_of_n, single_path

Strategy = Callable[..., Awaitable[SolveResult]]

REGISTRY: dict[str, Strategy] = {m.NAME: m.run for m in (single_path, best_of_n)}

__all__ = ["REGISTRY", "Strategy"]
