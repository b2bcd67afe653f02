"""Solver request, progress and result types, and the verifier port the core depends on."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rmesh.domain import Budget, Candidate, Precheck, SearchParams, TaskSpec, Usage, Verdict

# Absolute time.monotonic() by which the current call must finish (None: unbounded). The gRPC
# edge sets it from the caller's deadline; every port's downstream call carries what is left.
CALL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("rmesh_deadline", default=None)


@dataclass(frozen=True)
class SolveRequest:
    problem: str
    task: TaskSpec = field(default_factory=TaskSpec)
    evidence: Mapping[str, str] = field(default_factory=dict)
    strategy: str = "best_of_n"
    budget: Budget = field(default_factory=Budget)
    required_evidence: tuple[str, ...] = ()
    tenant: str = ""
    seed: int = 0
    search: SearchParams = field(default_factory=SearchParams)
    # The caller's precheck of this task (the router's); None: the solver prechecks itself.
    precheck: Precheck | None = None


@dataclass(frozen=True)
class Progress:
    stage: str
    branches_started: int
    branches_done: int
    usage: Usage
    checks_passed: int
    checks_total: int
    round: int = 0
    best_score: float = 0.0
    branches_pruned: int = 0
    stop_reason: str = ""


@dataclass(frozen=True)
class SolveResult:
    best: Candidate | None
    verdict: Verdict | None
    usage: Usage
    stop_reason: str
    candidates_evaluated: int
    eligible: bool
    strategy: str
    vote_share: float = 0.0
    peak_live_branches: int = 0
    peak_kv_bytes: int = 0
    engine_seconds: float = 0.0  # wall time spent inside engine calls


class VerifierPort(Protocol):
    async def precheck(self, task: TaskSpec, evidence: Mapping[str, str], required: Sequence[str]) -> Precheck: ...

    async def verify(
        self,
        task: TaskSpec,
        evidence: Mapping[str, str],
        required: Sequence[str],
        candidates: Sequence[Candidate],
        *,
        problem: str = "",
        learned: str = "",
        aggregation: str = "min",
    ) -> list[Verdict]: ...


Emit = Callable[[Progress], Awaitable[None]]

# Why a search stops; each names the rule that fired.
STOP_EXACT_CHECK_PASSED = "exact_check_passed"
# The same rule for a task without exact checks: the verifier found the answer eligible.
STOP_ELIGIBLE_ANSWER = "eligible_answer_found"
STOP_TOKEN_CAP = "token_cap"
STOP_WALL_CLOCK = "wall_clock"
STOP_BRANCH_CAP = "branch_cap"
STOP_DEPTH_CAP = "depth_cap"
STOP_REPEATED_STATE = "repeated_state"
STOP_NO_IMPROVEMENT = "no_improvement"
STOP_COMPLETED = "completed"
