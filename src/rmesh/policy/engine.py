"""Evaluate a compiled tenant policy against one request: pure, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from rmesh.policy.cel import LazyVariables, to_activation, truthy
from rmesh.policy.model import Decision, TenantPolicy

MATCH, SKIP = "match", "skip"
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
        matched=tuple(matched),
        errors=tuple(errors),
    )
