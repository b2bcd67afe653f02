"""Domain objects shared by the cores. Plain frozen dataclasses: no gRPC, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CheckSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    kind: str = ""
    checks: tuple[CheckSpec, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass(frozen=True)
class Budget:
    max_tokens: int = 1024
    max_branches: int = 4
    max_depth: int = 4
    wall_clock_seconds: float = 60.0
    max_tokens_per_branch: int = 256
    max_kv_bytes: int = 0  # 0: no per-request cap


@dataclass(frozen=True)
class SearchParams:
    samples: int = 0  # 0: budget.max_branches
    beam_width: int = 2
    branching_factor: int = 3
    prune_below: float = 0.0
    exploration: float = 1.5
    no_improvement_rounds: int = 2
    temperature: float | None = None  # None: each strategy's own default
    learned_score: str = ""  # "", "outcome" or "process": rank by a learned score after exact checks
    aggregation: str = "min"
    skip_greedy: bool = False


@dataclass(frozen=True)
class Checkpoint:
    text: str
    cites: tuple[str, ...] = ()


@dataclass(frozen=True)
class Candidate:
    id: str
    checkpoints: tuple[Checkpoint, ...] = ()
    verification_summary: str = ""
    final_answer: str = ""
    well_formed: bool = False

    @property
    def cited_keys(self) -> set[str]:
        return {key for cp in self.checkpoints for key in cp.cites}


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    release: bool
    missing_evidence: tuple[str, ...] = ()
    unknown_citations: tuple[str, ...] = ()
    uncited_required: tuple[str, ...] = ()
    ungrounded_claims: tuple[str, ...] = ()
    step_scores: tuple[float, ...] = ()
    learned_score: float | None = None  # a proxy: ranks candidates, never overrides exact checks
    learned_step_scores: tuple[float, ...] = ()
    checks: tuple[CheckResult, ...] = ()
    next_step: str = ""
    score: float = 0.0

    @property
    def checks_passed(self) -> int:
        return sum(1 for c in self.checks if c.passed)


@dataclass(frozen=True)
class Precheck:
    missing_evidence: tuple[str, ...]
    next_step: str
    numeric_answer: bool
    expression_answer: bool = False
    learned_scorer: str = ""
    learned_max_n: int = 0


NEXT_STEP_REQUEST_TOOL_DATA = "request_tool_data"
# Checkers that check an answer's form, not its truth: passing them alone verifies nothing
# (a caller's regex ".*" passes every answer).
FORMAT_CHECKS = frozenset({"regex", "json_schema"})


def verifies_answer(task: "TaskSpec") -> bool:
    """Whether any of the task's checks verifies the answer itself, not only its form."""
    return any(spec.name not in FORMAT_CHECKS for spec in task.checks)
NEXT_STEP_MORE_COMPUTE = "retry_with_more_compute"
NEXT_STEP_CITE_EVIDENCE = "regenerate_with_citations"
