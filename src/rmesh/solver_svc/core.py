"""The solver core: validates a routed request and runs the named strategy within its budget."""

from __future__ import annotations

import time

from opentelemetry import trace

from rmesh.engine import Engine
from rmesh.errors import InvalidRequest
from rmesh.solver_svc.model import Emit, SolveRequest, SolveResult, VerifierPort
from rmesh.solver_svc.search import SearchState
from rmesh.solver_svc.strategies import REGISTRY


# "extractive": with evidence and no numeric check, the final answer quotes evidence verbatim
# (the embedded 270M model writes fluent but invented prose); "free": the model writes it.
ANSWER_STYLES = ("extractive", "free")


class SolverCore:
    def __init__(
        self,
        engine: Engine,
        verifier: VerifierPort,
        tracer: trace.Tracer | None = None,
        answer_style: str = "extractive",
    ) -> None:
        if answer_style not in ANSWER_STYLES:
            raise ValueError(f"answer_style: {answer_style!r} is not one of {', '.join(ANSWER_STYLES)}")
        self.answer_style = answer_style
        self.engine = engine
        self.verifier = verifier
        self.tracer = tracer or trace.get_tracer("rmesh.solver")

    @staticmethod
    def strategy_names() -> list[str]:
        return sorted(REGISTRY)

    async def solve(self, request: SolveRequest, emit: Emit, deadline: float | None = None) -> SolveResult:
        """Run ``request.strategy``; ``deadline`` is an absolute ``time.monotonic()``."""
        if not request.problem.strip():
            raise InvalidRequest("problem", "must not be empty")
        strategy = REGISTRY.get(request.strategy)
        if strategy is None:
            raise InvalidRequest("strategy", f"unknown strategy {request.strategy!r}; known: {', '.join(self.strategy_names())}")
        budget = request.budget
        for name in ("max_tokens", "max_branches", "max_tokens_per_branch"):
            if getattr(budget, name) <= 0:
                raise InvalidRequest(f"budget.{name}", "must be positive")
        wall = time.monotonic() + budget.wall_clock_seconds if budget.wall_clock_seconds > 0 else None
        limit = min(d for d in (deadline, wall) if d is not None) if (deadline or wall) else time.monotonic() + 3600
        precheck = await self.verifier.precheck(request.task, request.evidence, request.required_evidence)
        state = SearchState(
            request=request,
            engine=self.engine,
            verifier=self.verifier,
            emit=emit,
            deadline=limit,
            numeric_answer=precheck.numeric_answer,
            tracer=self.tracer,
            extractive_answer=self.answer_style == "extractive",
        )
        span = trace.get_current_span()
        span.set_attribute("rmesh.strategy", request.strategy)
        result = await strategy(state=state)
        span.set_attribute("rmesh.stop_reason", result.stop_reason)
        span.set_attribute("rmesh.usage.completion_tokens", result.usage.completion_tokens)
        span.set_attribute("rmesh.usage.cached_tokens", result.usage.cached_tokens)
        return result
