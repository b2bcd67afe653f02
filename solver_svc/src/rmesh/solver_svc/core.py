"""The solver core: validates a routed request, sizes it against the KV budgets, and runs the
named strategy until one of its stop rules fires."""

from __future__ import annotations

import time

from opentelemetry import trace

from rmesh.engine import Engine
from rmesh.errors import DeadlineExceeded, InvalidRequest
from rmesh.solver_svc.kv_budget import KVLedger
from rmesh.solving import STOP_WALL_CLOCK, Emit, SolveRequest, SolveResult, VerifierPort
from rmesh.solver_svc.prompt import answer_choices, build_prompt
from rmesh.solver_svc.search import SearchState
from rmesh.solver_svc.strategies import REGISTRY, TREE_STRATEGIES

# "extractive": with evidence and no numeric check, the final answer quotes evidence verbatim
# (the embedded 270M model writes fluent but invented prose); "free": the model writes it.
ANSWER_STYLES = ("extractive", "free")

# Inclusive bounds; anything outside is INVALID_ARGUMENT before any engine call.
LIMITS = {
    "budget.max_tokens": (1, 200_000),
    "budget.max_branches": (1, 1024),
    "budget.max_depth": (1, 64),
    "budget.max_tokens_per_branch": (1, 8192),
    "budget.wall_clock_seconds": (0, 3600),
    "budget.max_kv_bytes": (0, 1 << 40),
    "search.samples": (0, 1024),
    "search.beam_width": (0, 1024),
    "search.branching_factor": (0, 64),
    "search.prune_below": (0, 1),
    "search.exploration": (0, 100),
    "search.no_improvement_rounds": (0, 1000),
    "search.temperature": (0, 2),
}


def validate(request: SolveRequest, strategy_names: list[str]) -> None:
    if not request.problem.strip():
        raise InvalidRequest("problem", "must not be empty")
    if request.strategy not in strategy_names:
        raise InvalidRequest("strategy", f"unknown strategy {request.strategy!r}; known: {', '.join(strategy_names)}")
    for path, (low, high) in LIMITS.items():
        group, name = path.split(".")
        value = getattr(request.budget if group == "budget" else request.search, name)
        if value is not None and not low <= value <= high:
            raise InvalidRequest(path, f"must be between {low} and {high}, got {value}")
    if request.search.samples > request.budget.max_branches:
        raise InvalidRequest("search.samples", f"{request.search.samples} exceeds budget.max_branches {request.budget.max_branches}")
    if request.search.learned_score not in ("", "outcome", "process"):
        raise InvalidRequest("search.learned_score", f"{request.search.learned_score!r} is not one of outcome, process")
    if request.search.aggregation not in ("min", "last", "prod"):
        raise InvalidRequest("search.aggregation", f"unknown aggregation {request.search.aggregation!r}; known: last, min, prod")
    if request.strategy == "beam" and request.search.beam_width > request.budget.max_branches:
        raise InvalidRequest(
            "search.beam_width",
            f"{request.search.beam_width} exceeds the branch cap budget.max_branches {request.budget.max_branches}",
        )


class SolverCore:
    def __init__(
        self,
        engine: Engine,
        verifier: VerifierPort,
        tracer: trace.Tracer | None = None,
        answer_style: str = "extractive",
        kv_ledger: KVLedger | None = None,
    ) -> None:
        if answer_style not in ANSWER_STYLES:
            raise ValueError(f"answer_style: {answer_style!r} is not one of {', '.join(ANSWER_STYLES)}")
        self.answer_style = answer_style
        self.engine = engine
        self.verifier = verifier
        self.tracer = tracer or trace.get_tracer("rmesh.solver")
        self.kv_ledger = kv_ledger

    @staticmethod
    def strategy_names() -> list[str]:
        return sorted(REGISTRY)

    def live_branch_cap(self, request: SolveRequest, prompt_tokens: int) -> int:
        """Branches that may be alive at once: the engine's limit, then the request's KV cap."""
        engine_cap = getattr(self.engine, "max_branches", request.budget.max_branches)
        cap = min(engine_cap, request.budget.max_branches)
        if request.budget.max_kv_bytes:
            per_token = self.engine.kv_bytes_per_token
            prompt_bytes = prompt_tokens * per_token
            if request.budget.max_kv_bytes < prompt_bytes:
                raise InvalidRequest(
                    "budget.max_kv_bytes",
                    f"{request.budget.max_kv_bytes} bytes is smaller than the prompt itself "
                    f"({prompt_tokens} tokens x {per_token} bytes = {prompt_bytes}); the smallest budget that "
                    f"fits one branch is {prompt_bytes + self._path_tokens(request) * per_token}",
                )
            path_tokens = self._path_tokens(request)
            room = (request.budget.max_kv_bytes - prompt_bytes) // (path_tokens * per_token)
            if room < 1:
                raise InvalidRequest(
                    "budget.max_kv_bytes",
                    f"{request.budget.max_kv_bytes} bytes leaves no room for one branch of {path_tokens} tokens; "
                    f"the smallest budget that fits one is {prompt_bytes + path_tokens * per_token}",
                )
            cap = min(cap, room)
        return cap

    def fit_to_capacity(self, live_cap: int, prompt_tokens: int, path_tokens: int, per_token: int, floor: int = 1) -> int:
        """Fewer live branches when the request's would not fit the solver's whole KV budget even
        alone: the search runs narrower (in more rounds) instead of being refused. ``floor`` is
        the fewest a round holds (a tree node's children); a request that cannot fit that many
        keeps its cap, and the ledger refuses it."""
        if self.kv_ledger is None:
            return live_cap
        room = self.kv_ledger.capacity // per_token - prompt_tokens
        fits = room // path_tokens if path_tokens > 0 else live_cap
        return live_cap if fits >= live_cap or fits < max(1, floor) else fits

    @staticmethod
    def _path_tokens(request: SolveRequest) -> int:
        budget = request.budget
        steps = budget.max_depth if request.strategy in TREE_STRATEGIES else 1
        return min(budget.max_tokens, budget.max_tokens_per_branch * steps)

    async def solve(self, request: SolveRequest, emit: Emit, deadline: float | None = None) -> SolveResult:
        """Run ``request.strategy``; ``deadline`` is an absolute ``time.monotonic()``."""
        validate(request, self.strategy_names())
        budget = request.budget
        # The gRPC deadline is hard (engine work is cancelled at it); the budget's wall clock is
        # checked between rounds, so a search that runs out of it still returns what it found.
        limit = deadline if deadline is not None else time.monotonic() + 3600
        wall = time.monotonic() + budget.wall_clock_seconds if budget.wall_clock_seconds > 0 else limit
        precheck = request.precheck or await self.verifier.precheck(request.task, request.evidence, request.required_evidence)
        extractive = self.answer_style == "extractive"
        prompt = build_prompt(
            request.problem, request.evidence, precheck.numeric_answer, extractive, precheck.expression_answer,
            self.engine.chat_template, answer_choices(request.task.checks),
        )
        measure = getattr(self.engine, "measure_tokens", None)
        prompt_tokens = await measure(prompt, limit, owner=request.tenant) if measure is not None else self.engine.count_tokens(prompt)
        live_cap = self.live_branch_cap(request, prompt_tokens)
        state = SearchState(
            request=request,
            engine=self.engine,
            verifier=self.verifier,
            emit=emit,
            deadline=limit,
            wall_deadline=min(wall, limit),
            numeric_answer=precheck.numeric_answer,
            tracer=self.tracer,
            live_cap=live_cap,
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            extractive_answer=extractive,
            expression_answer=precheck.expression_answer,
            learned_max_n=precheck.learned_max_n,
        )
        per_token = self.engine.kv_bytes_per_token
        path_tokens = self._path_tokens(request)
        # A tree search expands a node into all its children at once, however few are alive.
        floor = request.search.branching_factor if request.strategy in ("beam", "mcts") else 1
        fitted = self.fit_to_capacity(live_cap, prompt_tokens, path_tokens, per_token, floor)
        if fitted != live_cap:
            await state.report(
                f"fit to KV: at most {fitted} branches alive at once instead of {live_cap}, so the search fits "
                f"the solver's KV budget"
            )
            live_cap = state.live_cap = fitted
        span = trace.get_current_span()
        span.set_attributes({"rmesh.strategy": request.strategy, "rmesh.live_cap": live_cap})
        reserve = (prompt_tokens + max(live_cap, min(floor, request.budget.max_branches)) * path_tokens) * per_token
        if self.kv_ledger is None:
            result = await self._run(state)
        else:
            async with self.kv_ledger.reserve(reserve, max_wait=limit - time.monotonic()):
                result = await self._run(state)
        await state.report("stopped", result.stop_reason)
        span.set_attributes(
            {
                "rmesh.stop_reason": result.stop_reason,
                "rmesh.usage.completion_tokens": result.usage.completion_tokens,
                "rmesh.usage.cached_tokens": result.usage.cached_tokens,
                "rmesh.peak_kv_bytes": result.peak_kv_bytes,
            }
        )
        return result

    async def _run(self, state: SearchState) -> SolveResult:
        strategy = REGISTRY[state.request.strategy]
        try:
            return await strategy(state=state)
        except DeadlineExceeded:
            # Out of time mid-round: what was already judged still counts.
            if state.eligible():
                return state.result(state.request.strategy, STOP_WALL_CLOCK)
            raise
