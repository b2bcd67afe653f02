"""Solver request, progress and result types, and the verifier port the core depends on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rmesh.domain import Budget, Candidate, Precheck, TaskSpec, Usage, Verdict


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


@dataclass(frozen=True)
class Progress:
    stage: str
    branches_started: int
    branches_done: int
    usage: Usage
    checks_passed: int
    checks_total: int


@dataclass(frozen=True)
class SolveResult:
    best: Candidate | None
    verdict: Verdict | None
    usage: Usage
    stop_reason: str
    candidates_evaluated: int
    eligible: bool
    strategy: str


class VerifierPort(Protocol):
    async def precheck(self, task: TaskSpec, evidence: Mapping[str, str], required: Sequence[str]) -> Precheck: ...

    async def verify(
        self,
        task: TaskSpec,
        evidence: Mapping[str, str],
        required: Sequence[str],
        candidates: Sequence[Candidate],
    ) -> list[Verdict]: ...


Emit = Callable[[Progress], Awaitable[None]]

STOP_EXACT_CHECK_PASSED = "exact_check_passed"
STOP_BUDGET_EXHAUSTED = "budget_exhausted"
STOP_COMPLETED = "completed"
