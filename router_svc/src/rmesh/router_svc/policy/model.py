"""Compiled tenant policy and the decisions it makes. Immutable: a reload swaps whole snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field

from rmesh.domain import Budget, SearchParams
from rmesh.router_svc.policy.cel import CompiledExpression

ROLE_CALLER = "caller"
ROLE_REVIEWER = "reviewer"

# What can stand behind a released answer, weakest first (human approval outranks them all).
UNVERIFIED = "unverified"
CALIBRATED_SCORE = "calibrated_score"
EVIDENCE_GROUNDED = "evidence_grounded"
EXACT_CHECKS = "exact_checks"
HUMAN_APPROVED = "human_approved"
ASSURANCE_ORDER = (UNVERIFIED, CALIBRATED_SCORE, EVIDENCE_GROUNDED, EXACT_CHECKS, HUMAN_APPROVED)
WITHHOLD, ESCALATE = "withhold", "escalate"


def assurance_rank(level: str) -> int:
    return ASSURANCE_ORDER.index(level)


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    role: str = ROLE_CALLER


@dataclass(frozen=True)
class Route:
    name: str
    when: CompiledExpression | None
    difficulty: str
    strategies: tuple[str, ...]
    budget: Budget
    search: SearchParams
    max_cost: float | None = None
    # What a passing answer is worth, in generated tokens: the ladder spends no sample and
    # climbs no rung whose learned cost per success is over it (0: no limit).
    max_tokens_per_success: int = 0
    min_assurance: str = UNVERIFIED
    below_min_assurance: str = WITHHOLD
    high_impact: bool = False


@dataclass(frozen=True)
class EvidenceRule:
    name: str
    when: CompiledExpression
    require: tuple[str, ...]


@dataclass(frozen=True)
class EscalationRule:
    name: str
    when: CompiledExpression
    reason: str
    high_impact: bool = False


@dataclass(frozen=True)
class Tool:
    """An evidence tool: where the router fetches the keys it ``provides`` when a request lacks
    them. ``endpoint`` is grpc://, grpcs://, http:// or https://; ``arguments`` builds the
    call's arguments (a map of strings) from the request; the credential is the operator's file
    <tool secrets dir>/<tenant>/<credential>, read at each call, never taken from the caller."""

    name: str
    provides: tuple[str, ...]
    endpoint: str
    arguments: CompiledExpression
    timeout_seconds: float = 2.0
    max_calls: int = 1
    cache_ttl_seconds: float = 0.0
    credential: str = ""  # a secret's name in the tenant's own directory of tool secrets

    @property
    def evidence_read(self) -> frozenset[str]:
        """The evidence keys the arguments expression reads (``request.evidence.KEY``)."""
        return frozenset(path[1] for path in self.arguments.request_paths if len(path) > 1 and path[0] == "evidence")


@dataclass(frozen=True)
class Quotas:
    max_concurrent: int = 8
    tokens_per_window: int = 200_000
    window_seconds: float = 60.0


@dataclass(frozen=True)
class ReviewSettings:
    timeout_seconds: float = 86_400.0
    on_timeout: str = "reject"


@dataclass(frozen=True)
class Privacy:
    """What request content may reach telemetry; by default none does."""

    trace_content: bool = False
    sensitive_evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class TenantPolicy:
    tenant: str
    revision: str  # content hash of the file
    source: str
    keys: tuple[ApiKey, ...]
    variables: dict[str, CompiledExpression]
    routes: tuple[Route, ...]
    evidence: tuple[EvidenceRule, ...]
    escalate: tuple[EscalationRule, ...]
    on_error: dict[str, str]
    quotas: Quotas = Quotas()
    review: ReviewSettings = ReviewSettings()
    privacy: Privacy = Privacy()
    price_per_1k_completion: float = 0.0
    tests: tuple[dict, ...] = ()
    allow_python_tests: bool = False
    tools: tuple[Tool, ...] = ()


@dataclass(frozen=True)
class Decision:
    tenant: str
    revision: str
    route: str
    difficulty: str
    strategies: tuple[str, ...]
    budget: Budget
    search: SearchParams
    required_evidence: tuple[str, ...]
    escalate: bool
    escalation_reason: str
    # The weakest assurance the answer may be released with, and what happens below it.
    min_assurance: str = UNVERIFIED
    below_min_assurance: str = WITHHOLD
    high_impact: bool = False  # the request, its route or its escalation rule is high-impact
    max_tokens_per_success: int = 0  # the route's; 0: no limit
    matched: tuple[str, ...] = field(default_factory=tuple)  # rule names that matched, in order
    errors: tuple[str, ...] = field(default_factory=tuple)  # runtime errors and how on_error read them

    @property
    def strategy(self) -> str:
        return self.strategies[0]

    @property
    def why(self) -> str:
        route = f"route {self.route!r} ({self.difficulty})"
        extra = [f"evidence/escalation rules matched: {', '.join(m for m in self.matched if m != self.route)}"] if len(self.matched) > 1 else []
        if self.errors:
            extra.append("errors: " + "; ".join(self.errors))
        return "; ".join([route, *extra])
