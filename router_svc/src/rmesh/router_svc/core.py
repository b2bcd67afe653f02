"""The router core: validate, route by tenant, precheck evidence, search, gate the release.

The router re-verifies the solver's chosen candidate itself before releasing it: the release
decision belongs to the verifier's exact checks and evidence contract, not to the search.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from opentelemetry import trace

from rmesh.domain import Budget, Checkpoint, CheckResult, SearchParams, TaskSpec, Usage
from rmesh.errors import InvalidRequest
from rmesh.router_svc.policy.engine import DecisionCache, request_view
from rmesh.router_svc.policy.model import TenantPolicy
from rmesh.router_svc.ladder import plan
from rmesh.router_svc.quotas import Admission
from rmesh.router_svc.rung_log import RungLog
from rmesh.solving import Progress, SolveRequest, SolveResult, VerifierPort


MAX_PROBLEM_CHARS = 8000
# The prior's history is kept in memory and re-read from the store this often.
HISTORY_TTL_SECONDS = 30.0
HISTORY_LIMIT = 200
HISTORY_KINDS = 4096
# Climbing a rung with less than this left would only produce truncated answers.
MIN_ESCALATION_TOKENS = 64
# Strategies whose first (or only) branch is the greedy answer.
GREEDY_FIRST = frozenset({"single_pass", "single_path", "best_of_n"})
MAX_EVIDENCE_ITEMS = 64
MAX_EVIDENCE_VALUE_CHARS = 16_000
MAX_EVIDENCE_TOTAL_CHARS = 64_000
MAX_CHECKS = 32
MAX_KIND_CHARS = 128
_EVIDENCE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
# C0 and C1 control characters other than tab and line breaks: terminal escapes, NUL, bells.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

OUTCOME_RELEASED = "released"
OUTCOME_MISSING_EVIDENCE = "missing_evidence"
OUTCOME_NO_ELIGIBLE_ANSWER = "no_eligible_answer"
OUTCOME_ESCALATED = "escalated"
NEXT_STEP_HUMAN_REVIEW = "await_human_review"


@dataclass(frozen=True)
class RouterRequest:
    problem: str
    task: TaskSpec = field(default_factory=TaskSpec)
    # Values as received; validated to be strings here.
    evidence: Mapping[str, Any] = field(default_factory=dict)
    high_impact: bool = False


@dataclass(frozen=True)
class Status:
    message: str


@dataclass(frozen=True)
class Config:
    strategy: str
    budget: Budget
    tenant: str
    required_evidence: tuple[str, ...]
    reason: str
    policy_revision: str
    search: SearchParams = SearchParams()


@dataclass(frozen=True)
class Outcome:
    kind: str
    answer: str = ""
    checkpoints: tuple[Checkpoint, ...] = ()
    missing_evidence: tuple[str, ...] = ()
    next_step: str = ""
    strategy: str = ""
    usage: Usage = Usage()
    checks: tuple[CheckResult, ...] = ()
    stop_reason: str = ""
    reason: str = ""
    policy_revision: str = ""
    vote_share: float = 0.0
    review_id: str = ""

    @property
    def released(self) -> bool:
        return self.kind == OUTCOME_RELEASED


Event = Status | Config | Progress | Outcome


class SolverPort(Protocol):
    def solve(self, request: SolveRequest) -> AsyncIterator[Progress | SolveResult]: ...


def validate(request: RouterRequest) -> dict[str, str]:
    """Check the caller's request; return the evidence as a key → string mapping."""
    if not request.problem.strip():
        raise InvalidRequest("problem", "must not be empty")
    if len(request.problem) > MAX_PROBLEM_CHARS:
        raise InvalidRequest("problem", f"longer than {MAX_PROBLEM_CHARS} characters")
    _no_control_characters("problem", request.problem)
    kind = request.task.kind
    if len(kind) > MAX_KIND_CHARS:
        raise InvalidRequest("task.kind", f"longer than {MAX_KIND_CHARS} characters")
    _no_control_characters("task.kind", kind)
    if len(request.task.checks) > MAX_CHECKS:
        raise InvalidRequest("task.checks", f"more than {MAX_CHECKS} checks")
    if len(request.evidence) > MAX_EVIDENCE_ITEMS:
        raise InvalidRequest("evidence", f"more than {MAX_EVIDENCE_ITEMS} items")
    evidence: dict[str, str] = {}
    for key, value in request.evidence.items():
        if not _EVIDENCE_KEY.fullmatch(key):
            raise InvalidRequest(f"evidence.{key}", "key must match [A-Za-z_][A-Za-z0-9_.-]{0,63}")
        if not isinstance(value, str):
            raise InvalidRequest(f"evidence.{key}", f"value must be a string, got {_kind(value)}")
        if len(value) > MAX_EVIDENCE_VALUE_CHARS:
            raise InvalidRequest(f"evidence.{key}", f"longer than {MAX_EVIDENCE_VALUE_CHARS} characters")
        _no_control_characters(f"evidence.{key}", value)
        evidence[key] = value
    if sum(len(v) for v in evidence.values()) > MAX_EVIDENCE_TOTAL_CHARS:
        raise InvalidRequest("evidence", f"longer than {MAX_EVIDENCE_TOTAL_CHARS} characters in all")
    return evidence


# Longest problem or evidence value a span attribute carries when the tenant allows content.
TRACED_CONTENT_CHARS = 2000


def _annotate_span(policy: TenantPolicy, route: str, problem: str, evidence: Mapping[str, str]) -> None:
    """Routing facts on the router's span; request content only where the tenant's policy allows."""
    span = trace.get_current_span()
    span.set_attributes({"rmesh.tenant": policy.tenant, "rmesh.route": route, "rmesh.policy_revision": policy.revision})
    if not policy.privacy.trace_content:
        return
    span.set_attribute("rmesh.request.problem", problem[:TRACED_CONTENT_CHARS])
    for key, value in evidence.items():
        if key not in policy.privacy.sensitive_evidence:
            span.set_attribute(f"rmesh.request.evidence.{key}", value[:TRACED_CONTENT_CHARS])


def _no_control_characters(field_path: str, text: str) -> None:
    found = _CONTROL.search(text)
    if found:
        raise InvalidRequest(field_path, f"contains control character U+{ord(found.group()):04X} at offset {found.start()}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class RouterCore:
    def __init__(
        self, verifier: VerifierPort, solver: SolverPort, admission: Admission | None = None, reviews=None
    ) -> None:
        self.verifier = verifier
        self.solver = solver
        self.admission = admission or Admission()
        self.reviews = reviews  # a ReviewStore; escalations become reviews there
        self._rungs = RungLog(reviews)
        self._decisions = DecisionCache()
        # (tenant, kind) -> (when read, attempts newest first); least recently used first.
        self._history: OrderedDict[tuple[str, str], tuple[float, list[tuple[str, bool]]]] = OrderedDict()

    async def _rung_history(self, tenant: str, kind: str) -> list[tuple[str, bool]]:
        """The prior's recent attempts, newest first: from memory, re-read from the store after
        HISTORY_TTL_SECONDS so routers sharing a PostgreSQL store learn from each other. The
        memory holds HISTORY_KINDS kinds at most (callers name kinds freely)."""
        key = (tenant, kind)
        cached = self._history.get(key)
        if cached is not None and time.monotonic() - cached[0] < HISTORY_TTL_SECONDS:
            self._history.move_to_end(key)
            return cached[1]
        history = await asyncio.to_thread(self.reviews.rung_history, tenant, kind)
        self._history[key] = (time.monotonic(), history)
        self._history.move_to_end(key)
        while len(self._history) > HISTORY_KINDS:
            self._history.popitem(last=False)
        return history

    async def _record_rung(self, tenant: str, kind: str, rung: str, success: bool) -> None:
        """Learning data for the prior: in this router's memory at once, in the store in batches."""
        cached = self._history.get((tenant, kind))
        if cached is not None:
            self._history[(tenant, kind)] = (cached[0], [(rung, success), *cached[1]][:HISTORY_LIMIT])
        await self._rungs.add(tenant, kind, rung, success)

    async def drain(self) -> None:
        """Wait for the prior's pending writes (at shutdown, and in tests before reading them)."""
        await self._rungs.drain()

    async def solve(self, policy: TenantPolicy, request: RouterRequest) -> AsyncIterator[Event]:
        evidence = validate(request)
        yield Status("accepted")
        view = request_view(
            problem=request.problem,
            kind=request.task.kind,
            checks=[{"name": c.name, "params": c.params} for c in request.task.checks],
            evidence=evidence,
            high_impact=request.high_impact,
            tenant=policy.tenant,
        )
        decision = self._decisions.decide(policy, view)
        _annotate_span(policy, decision.route, request.problem, evidence)
        history: list[tuple[str, bool]] = []
        if self.reviews is not None and not decision.escalate:
            precheck, history = await asyncio.gather(
                self.verifier.precheck(request.task, evidence, decision.required_evidence),
                self._rung_history(policy.tenant, request.task.kind or "default"),
            )
        else:
            precheck = await self.verifier.precheck(request.task, evidence, decision.required_evidence)
        route_plan = plan(decision.strategies, history)
        yield Config(
            decision.strategies[route_plan.start],
            decision.budget,
            policy.tenant,
            decision.required_evidence,
            f"{decision.why}; ladder {' > '.join(decision.strategies)}: {route_plan.why}",
            decision.revision,
            decision.search,
        )
        common = dict(strategy=decision.strategy, policy_revision=decision.revision)
        if decision.escalate:
            # Unverifiable and high-impact: a person decides, not a deeper search.
            review_id = ""
            if self.reviews is not None:
                review = await asyncio.to_thread(
                    self.reviews.create,
                    policy.tenant,
                    request.problem,
                    decision.escalation_reason,
                    evidence,
                    decision.revision,
                    policy.review.timeout_seconds,
                    policy.review.on_timeout,
                )
                review_id = review.id
            yield Outcome(
                kind=OUTCOME_ESCALATED,
                next_step=NEXT_STEP_HUMAN_REVIEW,
                reason=f"escalated to human review: {decision.escalation_reason}",
                review_id=review_id,
                **common,
            )
            return
        if precheck.missing_evidence:
            yield Outcome(
                kind=OUTCOME_MISSING_EVIDENCE,
                missing_evidence=precheck.missing_evidence,
                next_step=precheck.next_step,
                reason="required evidence is missing; no model call was made",
                **common,
            )
            return
        kind = request.task.kind or "default"
        with self.admission.admit(policy.tenant, policy.quotas, decision.budget.max_tokens) as record:
            spent = Usage()
            result: SolveResult | None = None
            rung = route_plan.start
            greedy_tried = False
            while True:
                strategy = decision.strategies[rung]
                budget = replace(decision.budget, max_tokens=decision.budget.max_tokens - spent.completion_tokens)
                solve_request = SolveRequest(
                    problem=request.problem,
                    task=request.task,
                    evidence=evidence,
                    strategy=strategy,
                    budget=budget,
                    required_evidence=decision.required_evidence,
                    tenant=policy.tenant,
                    # A greedy answer was already judged on a cheaper rung: do not pay for it twice.
                    search=replace(decision.search, skip_greedy=rung > route_plan.start and greedy_tried),
                    precheck=precheck,
                )
                greedy_tried = greedy_tried or strategy in GREEDY_FIRST
                result = None
                async for item in self.solver.solve(solve_request):
                    if isinstance(item, SolveResult):
                        result = item
                    else:
                        so_far = spent + item.usage
                        record(so_far.completion_tokens)
                        yield replace(item, usage=so_far)
                if result is None:
                    raise RuntimeError("solver stream ended without a result")
                spent = spent + result.usage
                record(spent.completion_tokens)
                if self.reviews is not None:
                    await self._record_rung(policy.tenant, kind, strategy, result.eligible)
                left = decision.budget.max_tokens - spent.completion_tokens
                if result.eligible or not route_plan.escalate or rung + 1 >= len(decision.strategies) or left < MIN_ESCALATION_TOKENS:
                    break
                rung += 1
                # The verifier found nothing eligible: climb one rung with what the budget has left.
                yield Progress(
                    stage=f"escalate {strategy} -> {decision.strategies[rung]}",
                    branches_started=0,
                    branches_done=0,
                    usage=spent,
                    checks_passed=result.verdict.checks_passed if result.verdict else 0,
                    checks_total=len(result.verdict.checks) if result.verdict else 0,
                )
        result = replace(result, usage=spent, strategy=decision.strategies[rung])
        yield await self._gate(decision.revision, request.task, evidence, decision.required_evidence, result)

    async def _gate(
        self,
        revision: str,
        task: TaskSpec,
        evidence: dict[str, str],
        required: tuple[str, ...],
        result: SolveResult,
    ) -> Outcome:
        common = dict(
            strategy=result.strategy,
            usage=result.usage,
            stop_reason=result.stop_reason,
            policy_revision=revision,
            vote_share=result.vote_share,
        )
        if result.best is None:
            return Outcome(kind=OUTCOME_NO_ELIGIBLE_ANSWER, reason="the engine produced no candidate", **common)
        (verdict,) = await self.verifier.verify(task, evidence, required, [result.best])
        if verdict.release:
            return Outcome(
                kind=OUTCOME_RELEASED,
                answer=result.best.final_answer,
                checkpoints=result.best.checkpoints,
                checks=verdict.checks,
                reason="every exact check passed and every required evidence key is cited",
                **common,
            )
        problems = []
        if verdict.missing_evidence:
            problems.append("missing evidence " + ", ".join(verdict.missing_evidence))
        failed = [c.name for c in verdict.checks if not c.passed]
        if failed:
            problems.append("failed checks " + ", ".join(failed))
        if verdict.unknown_citations:
            problems.append("cites unknown evidence " + ", ".join(verdict.unknown_citations))
        if verdict.ungrounded_claims:
            problems.append("states facts its evidence lacks: " + ", ".join(verdict.ungrounded_claims))
        if verdict.uncited_required:
            problems.append("does not cite " + ", ".join(verdict.uncited_required))
        if not result.best.well_formed:
            problems.append("answer did not follow the response template")
        return Outcome(
            kind=OUTCOME_NO_ELIGIBLE_ANSWER,
            missing_evidence=verdict.missing_evidence,
            next_step=verdict.next_step,
            checks=verdict.checks,
            reason="no eligible answer within budget: " + ("; ".join(problems) or "not released"),
            **common,
        )
