"""Evaluate a compiled tenant policy against one request: pure, no I/O."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from rmesh.router_svc.policy.cel import LazyVariables, to_activation, truthy
from rmesh.router_svc.policy.model import CALIBRATED_SCORE, Decision, TenantPolicy, assurance_rank

MATCH, SKIP = "match", "skip"
DECISION_CACHE_SIZE = 4096
# Requests whose read parts are longer than this together are decided afresh, not remembered.
MAX_DECISION_KEY_CHARS = 4096
_TASK_FIELDS = ("kind", "checks")
DEFAULT_ON_ERROR = {"routes": SKIP, "evidence": MATCH, "escalate": MATCH}


def request_view(
    problem: str, kind: str, checks: list[dict], evidence: Mapping[str, str], high_impact: bool, tenant: str
) -> dict[str, Any]:
    """The request as policy expressions see it (the fields REQUEST_FIELDS declares)."""
    return {
        "problem": problem,
        "problem_chars": len(problem),
        "task": {"kind": kind, "checks": checks},
        "evidence": dict(evidence),
        "evidence_keys": sorted(evidence),
        "high_impact": high_impact,
        "tenant": tenant,
    }


def decide(policy: TenantPolicy, request: Mapping[str, Any]) -> Decision:
    variables = LazyVariables(policy.variables, request)
    on_error = {**DEFAULT_ON_ERROR, **policy.on_error}
    matched: list[str] = []
    errors: list[str] = []

    def holds(kind: str, name: str, expression) -> bool:
        if expression is None:
            return True
        try:
            value = expression.evaluate(to_activation(variables.request, variables.values_for(expression)))
            return truthy(value, f"{kind} {name}")
        except Exception as exc:  # a CEL runtime error: what it means is the tenant's choice
            outcome = on_error[kind] == MATCH
            errors.append(f"{kind} {name}: {str(exc).splitlines()[0][:120]} -> {'matched' if outcome else 'skipped'}")
            return outcome

    route = next(r for r in policy.routes if holds("routes", r.name, r.when))
    matched.append(route.name)
    required: list[str] = []
    for rule in policy.evidence:
        if holds("evidence", rule.name, rule.when):
            matched.append(rule.name)
            required += [k for k in rule.require if k not in required]
    escalation = next((r for r in policy.escalate if holds("escalate", r.name, r.when)), None)
    if escalation is not None:
        matched.append(escalation.name)
    high_impact = bool(request.get("high_impact")) or route.high_impact or bool(escalation and escalation.high_impact)
    min_assurance = route.min_assurance
    if high_impact and assurance_rank(min_assurance) < assurance_rank(CALIBRATED_SCORE):
        min_assurance = CALIBRATED_SCORE  # a high-impact answer is never released unverified
    budget = route.budget
    if route.max_cost is not None and policy.price_per_1k_completion > 0:
        affordable = math.floor(route.max_cost / policy.price_per_1k_completion * 1000)
        budget = replace(budget, max_tokens=max(1, min(budget.max_tokens, affordable)))
    return Decision(
        tenant=policy.tenant,
        revision=policy.revision,
        route=route.name,
        difficulty=route.difficulty,
        strategies=route.strategies,
        budget=budget,
        search=route.search,
        required_evidence=tuple(required),
        escalate=escalation is not None,
        escalation_reason=escalation.reason if escalation else "",
        min_assurance=min_assurance,
        below_min_assurance=route.below_min_assurance,
        high_impact=high_impact,
        max_tokens_per_success=route.max_tokens_per_success,
        matched=tuple(matched),
        errors=tuple(errors),
    )


def policy_reads(policy: TenantPolicy) -> tuple[tuple[str, ...], ...]:
    """The parts of a request any expression of the policy reads: a top-level field, or one of
    task's fields when the task is only read field by field."""
    expressions = [r.when for r in policy.routes] + [r.when for r in policy.evidence]
    expressions += [r.when for r in policy.escalate] + list(policy.variables.values())
    # The caller's high_impact flag raises the minimum assurance whatever the rules read.
    reads: set[tuple[str, ...]] = {("high_impact",)}
    for expression in expressions:
        for path in expression.request_paths if expression is not None else ():
            reads.add(path[:2] if path[0] == "task" and len(path) > 1 and path[1] in _TASK_FIELDS else path[:1])
    if ("task",) in reads:
        reads = {path for path in reads if path[0] != "task" or len(path) == 1}
    return tuple(sorted(reads))


class DecisionCache:
    """``decide`` once for all requests that agree on every part the policy reads.

    CEL is side-effect free and variables are expressions over the request, so a decision is a
    function of the policy revision and of the request parts its expressions read (their paths
    are known from compilation). A route on ``request.task.kind`` is evaluated once per kind,
    not once per request. Least recently used decisions go first past ``size``; requests whose
    read parts are long (a policy matching on the problem text) are decided afresh each time.
    """

    def __init__(self, size: int = DECISION_CACHE_SIZE) -> None:
        self.size = size
        self.hits = 0
        self._reads: dict[tuple[str, str], tuple[tuple[str, ...], ...]] = {}
        self._decisions: OrderedDict[tuple, Decision] = OrderedDict()

    def decide(self, policy: TenantPolicy, request: Mapping[str, Any]) -> Decision:
        revision = (policy.tenant, policy.revision)
        reads = self._reads.get(revision)
        if reads is None:
            if len(self._reads) >= self.size:
                self._reads.clear()
            reads = self._reads[revision] = policy_reads(policy)
        parts: list[Any] = []
        chars = 0
        for path in reads:
            value: Any = request
            for name in path:
                value = value[name]
            if not isinstance(value, (str, int, float)):  # bool is an int
                value = json.dumps(value, sort_keys=True, separators=(",", ":"))
            chars += len(value) if isinstance(value, str) else 8
            parts.append(value)
        if chars > MAX_DECISION_KEY_CHARS:
            return decide(policy, request)
        key = (revision, tuple(parts))
        decision = self._decisions.get(key)
        if decision is not None:
            self._decisions.move_to_end(key)
            self.hits += 1
            return decision
        decision = self._decisions[key] = decide(policy, request)
        while len(self._decisions) > self.size:
            self._decisions.popitem(last=False)
        return decision
