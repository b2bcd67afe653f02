"""The router core: validate, route by tenant, precheck evidence, search, gate the release.

The router re-verifies the solver's chosen candidate itself before releasing it: the release
decision belongs to the verifier's exact checks and evidence contract, not to the search.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from opentelemetry import trace

from rmesh.domain import Budget, Checkpoint, CheckResult, Precheck, SearchParams, TaskSpec, Usage, Verdict, verifies_answer
from rmesh.errors import DeadlineExceeded, InvalidRequest, PermissionDenied, ResourceExhausted, Unavailable
from rmesh.router_svc import reviews as reviews_module
from rmesh.router_svc.policy.engine import DecisionCache, request_view
from rmesh.router_svc.policy.model import (
    CALIBRATED_SCORE,
    ESCALATE,
    EVIDENCE_GROUNDED,
    EXACT_CHECKS,
    HUMAN_APPROVED,
    UNVERIFIED,
    Decision,
    TenantPolicy,
    assurance_rank,
)
from rmesh.router_svc.reviews import Review
from rmesh.router_svc.ladder import BEST_OF_N, Attempt, plan
from rmesh.router_svc.quotas import Admission
from rmesh.router_svc.rung_log import RungLog
from rmesh.router_svc.tools import EvidenceTools, Filled, Provenance, value_kind
from rmesh.solving import CALL_DEADLINE, Progress, SolveRequest, SolveResult, VerifierPort


log = logging.getLogger("rmesh.router")
MAX_PROBLEM_CHARS = 8000
# The prior's history is kept in memory and re-read from the store this often.
HISTORY_TTL_SECONDS = 30.0
HISTORY_LIMIT = reviews_module.RUNG_ROWS_KEPT  # what the store keeps per kind
HISTORY_KINDS = 4096
# The prior's read never holds a Solve up longer than this; past it, the ladder starts at rung 0.
PRIOR_TIMEOUT_SECONDS = 0.5
# Climbing a rung with less than this left would only produce truncated answers.
MIN_ESCALATION_TOKENS = 64
# Nor is a rung worth starting with less wall clock than this left.
MIN_ESCALATION_SECONDS = 1.0
# Time kept back from the caller's deadline for the release gate and the final event.
GATE_RESERVE_SECONDS = 2.0
# The most wall clock a solver call takes (the solver's own limit on budget.wall_clock_seconds).
MAX_WALL_SECONDS = 3600.0
# Strategies whose first (or only) branch is the greedy answer.
GREEDY_FIRST = frozenset({"single_pass", "single_path", "best_of_n"})
MAX_EVIDENCE_ITEMS = 64
MAX_EVIDENCE_VALUE_CHARS = 16_000
MAX_EVIDENCE_TOTAL_CHARS = 64_000
MAX_CHECKS = 32
MAX_KIND_CHARS = 128
MAX_CHECK_NAME_CHARS = 64
PYTHON_TESTS = "python_tests"
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
    await_review: bool = False  # wait for a human decision when escalated


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
    assurance: str = ""  # what stands behind a released answer (policy.model's levels)
    evidence_sources: tuple[Provenance, ...] = ()  # where each evidence value came from

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
    for index, spec in enumerate(request.task.checks):
        if len(spec.name) > MAX_CHECK_NAME_CHARS:
            raise InvalidRequest(f"task.checks[{index}].name", f"longer than {MAX_CHECK_NAME_CHARS} characters")
    if len(request.evidence) > MAX_EVIDENCE_ITEMS:
        raise InvalidRequest("evidence", f"more than {MAX_EVIDENCE_ITEMS} items")
    evidence: dict[str, str] = {}
    for key, value in request.evidence.items():
        if not _EVIDENCE_KEY.fullmatch(key):
            raise InvalidRequest(f"evidence.{key}", "key must match [A-Za-z_][A-Za-z0-9_.-]{0,63}")
        if not isinstance(value, str):
            raise InvalidRequest(f"evidence.{key}", f"value must be a string, got {value_kind(value)}")
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


class RouterCore:
    def __init__(
        self, verifier: VerifierPort, solver: SolverPort, admission: Admission | None = None, reviews=None,
        tools: EvidenceTools | None = None,
    ) -> None:
        self.verifier = verifier
        self.solver = solver
        self.tools = tools or EvidenceTools()
        self.admission = admission or Admission()
        self.reviews = reviews  # a ReviewStore; escalations become reviews there
        self._rungs = RungLog(reviews)
        self._decisions = DecisionCache()
        # (tenant, kind) -> (when read, attempts newest first); least recently used first.
        self._history: OrderedDict[tuple[str, str], tuple[float, list[Attempt]]] = OrderedDict()
        # (tenant, route) -> (when read, (kind, attempt) newest first): what other kinds lend.
        self._route_history: OrderedDict[tuple[str, str], tuple[float, list[tuple[str, Attempt]]]] = OrderedDict()

    async def _rung_history(self, tenant: str, kind: str) -> list[Attempt]:
        """The prior's recent attempts, newest first: from memory, re-read from the store after
        HISTORY_TTL_SECONDS so routers sharing a PostgreSQL store learn from each other. The
        memory holds HISTORY_KINDS kinds at most (callers name kinds freely)."""
        return await _remembered(self._history, (tenant, kind), self.reviews.rung_history)

    async def _pooled_history(self, tenant: str, route: str, kind: str) -> list[Attempt]:
        """The route's other kinds' recent attempts, newest first, from memory or the store as
        ``_rung_history`` reads a kind's own."""
        rows = await _remembered(self._route_history, (tenant, route), self.reviews.route_history)
        return [attempt for other, attempt in rows if other != kind]

    async def _record_rung(self, tenant: str, route: str, kind: str, rung: str, result: SolveResult) -> None:
        """Learning data for the prior: in this router's memory at once, in the store in batches."""
        attempt = Attempt(rung, result.eligible, result.usage.completion_tokens, result.candidates_evaluated)
        cached = self._history.get((tenant, kind))
        if cached is not None:
            self._history[(tenant, kind)] = (cached[0], [attempt, *cached[1]][:HISTORY_LIMIT])
        pooled = self._route_history.get((tenant, route))
        if pooled is not None:
            self._route_history[(tenant, route)] = (pooled[0], [(kind, attempt), *pooled[1]][:HISTORY_LIMIT])
        await self._rungs.add(tenant, kind, *attempt)

    async def drain(self) -> None:
        """Wait for the prior's pending writes (at shutdown, and in tests before reading them)."""
        await self._rungs.drain()

    async def close(self) -> None:
        """Close the evidence tools' connections (at shutdown)."""
        await self.tools.close()

    async def solve(
        self, policy: TenantPolicy, request: RouterRequest, caller: str = "", deadline: float | None = None
    ) -> AsyncIterator[Event]:
        """``caller`` is the name of the key that sent the request (its reviews are its own);
        ``deadline`` the call's monotonic deadline, which bounds waiting for a review. The
        outcome says where each evidence value came from."""
        sources: dict[str, Provenance] = {}
        # Closed with this generator, in its context: a caller that stops reading still has the
        # search charged and its deadline reset where they were set.
        async with contextlib.aclosing(self._solve(policy, request, caller, deadline, sources)) as events:
            async for event in events:
                if isinstance(event, Outcome):
                    event = replace(event, evidence_sources=tuple(sources[key] for key in sorted(sources)))
                yield event

    async def _solve(
        self, policy: TenantPolicy, request: RouterRequest, caller: str, deadline: float | None,
        sources: dict[str, Provenance],
    ) -> AsyncIterator[Event]:
        evidence = validate(request)
        allowed_checks(policy, request.task)
        sources.update({
            key: Provenance.of(key, value, hashed=key not in policy.privacy.sensitive_evidence) for key, value in evidence.items()
        })
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
        history: list[Attempt] = []
        pooled: list[Attempt] = []
        kind = prior_key(decision.route, request.task.kind)
        if self.reviews is not None:
            precheck, history, pooled = await asyncio.gather(
                self.verifier.precheck(request.task, evidence, decision.required_evidence),
                self._rung_history(policy.tenant, kind),
                self._pooled_history(policy.tenant, decision.route, kind),
            )
        else:
            precheck = await self.verifier.precheck(request.task, evidence, decision.required_evidence)
        route_plan = plan(
            decision.strategies, history, budget_tokens=decision.budget.max_tokens,
            max_samples=decision.search.samples or decision.budget.max_branches,
            worth=decision.max_tokens_per_success, pooled=pooled,
        )
        yield Config(
            decision.strategies[route_plan.start],
            decision.budget,
            policy.tenant,
            decision.required_evidence,
            f"{decision.why}; ladder {' > '.join(decision.strategies)}: {route_plan.why}",
            decision.revision,
            decision.search,
        )
        fetching = bool(precheck.missing_evidence and policy.tools)
        if precheck.missing_evidence and not fetching:
            # Escalated or not, nothing is drafted without the evidence the answer must cite.
            yield _missing_evidence(precheck, {}, decision)
            return
        started = time.monotonic()
        # Admitted before any tool is called: a tenant over its quota makes no tool calls either.
        async with self.admission.admit(policy.tenant, policy.quotas, decision.budget.max_tokens) as record:
            if fetching:
                # The tenant's own tools may have what the caller did not send. Their answers
                # are data: they fill missing keys only, and the decision above stands.
                filled = await self.tools.fill(
                    policy, view, precheck.missing_evidence, deadline - GATE_RESERVE_SECONDS if deadline is not None else None
                )
                failures = dict(filled.failures)
                room = MAX_EVIDENCE_TOTAL_CHARS - sum(len(v) for v in evidence.values())
                if sum(len(v) for v in filled.values.values()) > room:
                    # The caller's limit holds for the evidence as a whole, fetched or not.
                    failures.update({k: f"{f.tool}: its answer would take the evidence past {MAX_EVIDENCE_TOTAL_CHARS} characters in all" for f in filled.fetched for k in f.values})
                    filled = Filled((), failures)
                for event in _fetch_progress(filled):
                    yield event
                for fetched in filled.fetched:
                    for key, value in fetched.values.items():
                        evidence[key] = value
                        sources[key] = Provenance.of(
                            key, value, fetched.tool, fetched.fetched_at, hashed=key not in policy.privacy.sensitive_evidence
                        )
                if filled.fetched:
                    precheck = await self.verifier.precheck(request.task, evidence, decision.required_evidence)
                if precheck.missing_evidence:
                    yield _missing_evidence(precheck, failures, decision)
                    return
            spent = Usage()
            result: SolveResult | None = None
            kept: tuple[int, SolveResult] | None = None  # the best result of the rungs run so far
            stopped = ""  # why a higher rung ended without a result
            rung = route_plan.start
            greedy_tried = False
            while True:
                strategy = decision.strategies[rung]
                budget = replace(
                    decision.budget,
                    max_tokens=decision.budget.max_tokens - spent.completion_tokens,
                    wall_clock_seconds=_wall_budget(_wall_left(decision.budget.wall_clock_seconds, started, deadline)),
                )
                solve_request = SolveRequest(
                    problem=request.problem,
                    task=request.task,
                    evidence=evidence,
                    strategy=strategy,
                    budget=budget,
                    required_evidence=decision.required_evidence,
                    tenant=policy.tenant,
                    # A greedy answer was already judged on a cheaper rung: do not pay for it twice.
                    search=replace(
                        decision.search,
                        skip_greedy=rung > route_plan.start and greedy_tried,
                        samples=route_plan.samples if strategy == BEST_OF_N and route_plan.samples else decision.search.samples,
                    ),
                    precheck=precheck,
                )
                greedy_tried = greedy_tried or strategy in GREEDY_FIRST
                result = None
                def charge(item: Progress, spent: Usage = spent) -> None:
                    # Branches still decoding may be cut off by a cancel or an error before they
                    # report: until they do, each counts at its token cap.
                    in_flight = max(0, item.branches_started - item.branches_done)
                    record((spent + item.usage).completion_tokens + in_flight * decision.budget.max_tokens_per_branch)

                last: Progress | None = None
                # The solver's call ends early enough to leave the release gate its time: a rung
                # cut off at the hard deadline would leave nothing to gate what was kept.
                narrowed = CALL_DEADLINE.set(_solver_deadline(started, deadline))
                try:
                    async for item in _read_ahead(self.solver.solve(solve_request), charge):
                        if isinstance(item, SolveResult):
                            result = item
                        else:
                            last = item
                            yield replace(item, usage=spent + item.usage)
                    if result is None:
                        raise Unavailable("solver stream ended without a result")
                except (ResourceExhausted, Unavailable, DeadlineExceeded) as exc:
                    if kept is None:
                        raise  # nothing ran before this rung: the caller gets the status
                    # A higher rung failed: what the lower rungs found is kept, never thrown away.
                    # The outcome names the kind of failure; its details (addresses, free KV)
                    # stay in the router's log.
                    spent = spent + (last.usage if last is not None else Usage())
                    why = next(text for kind, text in _RUNG_FAILURES.items() if isinstance(exc, kind))
                    stopped = f"{strategy} stopped without a result ({why})"
                    log.warning(
                        "tenant %s: %s stopped (%s: %s); keeping the %s result",
                        policy.tenant, strategy, type(exc).__name__, exc.message, decision.strategies[kept[0]],
                    )
                    yield Progress(
                        stage=f"{strategy} failed; keeping the {decision.strategies[kept[0]]} result",
                        branches_started=0, branches_done=0, usage=spent,
                        checks_passed=_checks_passed(kept[1]), checks_total=_checks_total(kept[1]),
                        stop_reason=type(exc).__name__,
                    )
                    rung, result = kept
                    break
                finally:
                    CALL_DEADLINE.reset(narrowed)
                spent = spent + result.usage
                record(spent.completion_tokens)
                if self.reviews is not None:
                    await self._record_rung(policy.tenant, decision.route, kind, strategy, result)
                kept = (rung, result) if kept is None or _better(result, kept[1]) else kept
                left = decision.budget.max_tokens - spent.completion_tokens
                wall = _wall_left(decision.budget.wall_clock_seconds, started, deadline)
                if (
                    result.eligible or rung + 1 > route_plan.last
                    or left < MIN_ESCALATION_TOKENS or wall < MIN_ESCALATION_SECONDS
                ):
                    rung, result = kept
                    break
                rung += 1
                # The verifier found nothing eligible: climb one rung with what the budget has left.
                yield Progress(
                    stage=f"escalate {strategy} -> {decision.strategies[rung]}",
                    branches_started=0,
                    branches_done=0,
                    usage=spent,
                    checks_passed=_checks_passed(result),
                    checks_total=_checks_total(result),
                )
        result = replace(result, usage=spent, strategy=decision.strategies[rung])
        gate = await self._gate(decision, request, evidence, result, precheck)
        if stopped:
            gate = replace(gate, problems="; ".join(p for p in (gate.problems, stopped) if p))
        below = gate.eligible and assurance_rank(gate.assurance) < assurance_rank(decision.min_assurance)
        if decision.escalate or (below and decision.below_min_assurance == ESCALATE):
            why = decision.escalation_reason if decision.escalate else (
                f"its assurance ({gate.assurance}) is below the route's minimum ({decision.min_assurance})"
            )
            async for event in self._escalate(policy, request, caller, evidence, decision, gate, why, deadline, sources):
                yield event
            return
        yield gate.outcome(decision, below)

    async def _gate(
        self,
        decision: Decision,
        request: RouterRequest,
        evidence: dict[str, str],
        result: SolveResult,
        precheck: Precheck,
    ) -> Gate:
        """Re-verify the solver's choice. With a calibration configured and no exact check, the
        calibrated learned score gates release here too."""
        if result.best is None:
            return Gate(result, None, "", "the engine produced no candidate")
        calibrated = precheck.learned_max_n > 0 and not verifies_answer(request.task)
        (verdict,) = await self.verifier.verify(
            request.task,
            evidence,
            decision.required_evidence,
            [result.best],
            problem=request.problem if calibrated else "",
            learned="outcome" if calibrated else "",
        )
        if verdict.release:
            return Gate(result, verdict, assurance_of(request.task, decision.required_evidence, calibrated), "")
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
        if calibrated and not problems and verdict.learned_score is not None:
            problems.append(f"calibrated learned score {verdict.learned_score:.3f} is below the release threshold")
        return Gate(result, verdict, "", "; ".join(problems) or "not released")

    async def _escalate(
        self,
        policy: TenantPolicy,
        request: RouterRequest,
        caller: str,
        evidence: dict[str, str],
        decision: Decision,
        gate: Gate,
        why: str,
        deadline: float | None,
        sources: Mapping[str, Provenance],
    ) -> AsyncIterator[Event]:
        """A person decides on the draft: the review holds it, with where each evidence value
        came from; the caller may wait for the decision."""
        draft = gate.draft(decision)
        draft["evidence_sources"] = [
            {"key": p.key, "source": p.source, "fetched_at": p.fetched_at, "sha256": p.sha256} for _, p in sorted(sources.items())
        ]
        review_id = ""
        if self.reviews is not None:
            review = await asyncio.to_thread(
                self.reviews.create,
                policy.tenant,
                request.problem,
                why,
                evidence,
                decision.revision,
                policy.review.timeout_seconds,
                policy.review.on_timeout,
                caller=caller,
                draft=draft,
            )
            review_id = review.id
        pending = Outcome(
            kind=OUTCOME_ESCALATED,
            next_step=NEXT_STEP_HUMAN_REVIEW,
            reason=f"escalated to human review: {why}",
            review_id=review_id,
            strategy=gate.result.strategy,
            usage=gate.result.usage,
            checks=gate.verdict.checks if gate.verdict else (),
            stop_reason=gate.result.stop_reason,
            policy_revision=decision.revision,
        )
        if not (request.await_review and review_id):
            yield pending
            return
        yield Status(f"escalated to human review {review_id}: awaiting the decision")
        while deadline is None or deadline - time.monotonic() > REVIEW_POLL_SECONDS + REVIEW_ANSWER_MARGIN_SECONDS:
            await asyncio.sleep(REVIEW_POLL_SECONDS)
            review = await asyncio.to_thread(self.reviews.get, policy.tenant, review_id)
            decided = outcome_of_review(review)
            if decided is not None:
                yield decided
                return
        yield replace(pending, reason=pending.reason + "; no decision before the call's deadline")


def _missing_evidence(precheck: Precheck, failures: Mapping[str, str], decision: Decision) -> Outcome:
    """Nothing is drafted without the evidence the answer must cite: what is missing, and which
    tool failed to supply each key."""
    why = [f"{key} ({failures[key]})" for key in precheck.missing_evidence if key in failures]
    return Outcome(
        kind=OUTCOME_MISSING_EVIDENCE,
        missing_evidence=precheck.missing_evidence,
        next_step=precheck.next_step,
        reason="required evidence is missing" + (f": {', '.join(why)}" if why else "") + "; no model call was made",
        strategy=decision.strategy,
        policy_revision=decision.revision,
    )


def _fetch_progress(filled: Filled) -> list[Progress]:
    """One progress event per tool: what it fetched (keys, never values) or why it failed."""
    events = [Progress(stage=f.describe(), branches_started=0, branches_done=0, usage=Usage(), checks_passed=0, checks_total=0) for f in filled.fetched]
    failed: dict[str, str] = {}
    for reason in filled.failures.values():
        tool, _, why = reason.partition(": ")
        if why and tool not in failed:
            failed[tool] = why
    events += [
        Progress(stage=f"{tool} failed: {why}", branches_started=0, branches_done=0, usage=Usage(), checks_passed=0, checks_total=0)
        for tool, why in failed.items()
    ]
    return events


async def _remembered(memory: OrderedDict, key: tuple[str, str], read) -> list:
    """``read(*key)`` from memory while fresh, else from the store, keeping HISTORY_KINDS keys at
    most; when the store is down or slow, what memory holds, or nothing (the ladder then
    starts at its first rung)."""
    cached = memory.get(key)
    if cached is not None and time.monotonic() - cached[0] < HISTORY_TTL_SECONDS:
        memory.move_to_end(key)
        return cached[1]
    try:
        rows = await asyncio.wait_for(asyncio.to_thread(read, *key), PRIOR_TIMEOUT_SECONDS)
    except Exception as exc:
        # What memory holds (or nothing) serves until the next read is due: a slow or failing
        # store is asked once per HISTORY_TTL_SECONDS, not by every request.
        rows = cached[1] if cached is not None else []
        memory[key] = (time.monotonic(), rows)
        log.warning("reading the prior for %s/%s failed (%s): using what this router holds", *key, type(exc).__name__)
        return rows
    memory[key] = (time.monotonic(), rows)
    memory.move_to_end(key)
    while len(memory) > HISTORY_KINDS:
        memory.popitem(last=False)
    return rows


def prior_key(route: str, kind: str) -> str:
    """What the learned prior is kept under, within a tenant: the route (each has its own
    ladder) and the caller's task kind."""
    return f"{route}/{kind or 'default'}"


def _wall_left(route_seconds: float, started: float, deadline: float | None) -> float:
    """Wall clock the next rung may use: the route's, shared by the whole ladder, and never past
    the caller's deadline less the time the release gate needs (the search returns what it
    has found when its wall clock runs out, where a deadline would cut it off with nothing)."""
    now = time.monotonic()
    left = route_seconds - (now - started) if route_seconds > 0 else float("inf")
    hard = _solver_deadline(started, deadline)
    if hard is not None:
        left = min(left, hard - now)
    return left  # inf: no limit


def _wall_budget(left: float) -> float:
    """The solver's ``wall_clock_seconds`` for ``left`` (0 there means no limit; it takes at
    most MAX_WALL_SECONDS)."""
    return 0.0 if left == float("inf") else min(MAX_WALL_SECONDS, max(0.01, left))


def _solver_deadline(started: float, deadline: float | None) -> float | None:
    """The hard deadline of one rung's solver call: the caller's, less the gate's reserve."""
    if deadline is None:
        return None
    return deadline - min(GATE_RESERVE_SECONDS, 0.2 * (deadline - started))


_RUNG_FAILURES = {
    ResourceExhausted: "the solver's KV budget or a quota ran out",
    Unavailable: "the solver or its engine was unavailable",
    DeadlineExceeded: "its time ran out",
}


def _checks_passed(result: SolveResult) -> int:
    return result.verdict.checks_passed if result.verdict else 0


def _checks_total(result: SolveResult) -> int:
    return len(result.verdict.checks) if result.verdict else 0


def _better(new: SolveResult, old: SolveResult) -> bool:
    """Whether a higher rung's result replaces the one kept: an eligible answer first, then any
    answer over none, then more checks passed; a tie goes to the higher rung's."""
    def rank(result: SolveResult) -> tuple:
        return (result.eligible, result.best is not None, _checks_passed(result))

    return rank(new) >= rank(old)


async def _read_ahead(stream: AsyncIterator, on_progress) -> AsyncIterator:
    """The solver's events, read as they come whatever pace the caller reads at: each progress
    is charged to the tenant on arrival, so a caller that stops reading cannot let the search
    run on uncharged. Leaving early (a cancel) stops the reading and the solver's stream."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump() -> None:
        try:
            async for item in stream:
                if isinstance(item, Progress):
                    on_progress(item)
                queue.put_nowait(item)
        except BaseException as exc:  # handed to the reader, which raises it
            queue.put_nowait(exc)
            return
        queue.put_nowait(done)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass


# How often a waiting Solve re-reads its review, and the time kept back to send the last event.
REVIEW_POLL_SECONDS = 0.2
REVIEW_ANSWER_MARGIN_SECONDS = 0.3
NEXT_STEP_ADD_CHECK = "add_exact_check_or_evidence"


def allowed_checks(policy: TenantPolicy, task: TaskSpec) -> None:
    """Checkers that run caller code are the tenant's opt-in, never a default."""
    for index, spec in enumerate(task.checks):
        if spec.name == PYTHON_TESTS and not policy.allow_python_tests:
            raise PermissionDenied(
                f"task.checks[{index}].name: python_tests runs caller code and is not enabled for tenant "
                f"{policy.tenant} (allow_python_tests in its policy file)"
            )


def assurance_of(task: TaskSpec, required: tuple[str, ...], calibrated: bool) -> str:
    """The strongest thing behind an answer the gate released. Format checks (a regex, a JSON
    schema) must pass, but alone they verify nothing."""
    if verifies_answer(task):
        return EXACT_CHECKS
    if required:
        return EVIDENCE_GROUNDED
    if calibrated:
        return CALIBRATED_SCORE
    return UNVERIFIED


_ASSURANCE_WORDS = {
    EXACT_CHECKS: "every exact check passed",
    EVIDENCE_GROUNDED: "every required evidence key is cited and every stated number or date is in it",
    CALIBRATED_SCORE: "its calibrated learned score cleared the release threshold",
    UNVERIFIED: "unverified: no exact check, no required evidence and no calibrated score stands behind it",
    HUMAN_APPROVED: "approved by a human reviewer",
}


@dataclass(frozen=True)
class Gate:
    """The release gate's reading of the solver's choice."""

    result: SolveResult
    verdict: Verdict | None
    assurance: str  # set only when the verdict allows release
    problems: str

    @property
    def eligible(self) -> bool:
        return self.verdict is not None and self.verdict.release

    def outcome(self, decision: Decision, below_minimum: bool) -> Outcome:
        result, verdict = self.result, self.verdict
        common = dict(
            strategy=result.strategy,
            usage=result.usage,
            stop_reason=result.stop_reason,
            policy_revision=decision.revision,
            vote_share=result.vote_share,
            checks=verdict.checks if verdict else (),
        )
        if self.eligible and not below_minimum:
            return Outcome(
                kind=OUTCOME_RELEASED,
                answer=result.best.final_answer,
                checkpoints=result.best.checkpoints,
                reason="released: " + _ASSURANCE_WORDS[self.assurance],
                assurance=self.assurance,
                **common,
            )
        if self.eligible:
            return Outcome(
                kind=OUTCOME_NO_ELIGIBLE_ANSWER,
                next_step=NEXT_STEP_ADD_CHECK,
                reason=(
                    f"not released: its assurance ({self.assurance}) is below the minimum ({decision.min_assurance})"
                    + (" for a high-impact request" if decision.high_impact else "")
                ),
                **common,
            )
        if verdict is None:
            return Outcome(kind=OUTCOME_NO_ELIGIBLE_ANSWER, reason=self.problems, **common)
        return Outcome(
            kind=OUTCOME_NO_ELIGIBLE_ANSWER,
            missing_evidence=verdict.missing_evidence,
            next_step=verdict.next_step,
            reason="no eligible answer within budget: " + self.problems,
            **common,
        )

    def draft(self, decision: Decision) -> dict:
        """What a review holds, as stored."""
        best, verdict = self.result.best, self.verdict
        usage = self.result.usage
        return {
            "answer": best.final_answer if best else "",
            "checkpoints": [[cp.text, list(cp.cites)] for cp in best.checkpoints] if best else [],
            "checks": [[c.name, c.passed, c.detail] for c in verdict.checks] if verdict else [],
            "assurance": self.assurance,
            "strategy": self.result.strategy,
            "usage": [usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens],
            "gate_reason": _ASSURANCE_WORDS[self.assurance] if self.eligible else self.problems,
            # The least a release without a person must have (on_timeout: approve).
            "min_assurance": decision.min_assurance,
        }


def draft_parts(draft: Mapping[str, Any]) -> tuple[tuple[Checkpoint, ...], tuple[CheckResult, ...], Usage]:
    checkpoints = tuple(Checkpoint(text, tuple(cites)) for text, cites in draft.get("checkpoints", []))
    checks = tuple(CheckResult(name, bool(passed), detail) for name, passed, detail in draft.get("checks", []))
    usage = Usage(*draft.get("usage", [0, 0, 0]))
    return checkpoints, checks, usage


def outcome_of_review(review: Review) -> Outcome | None:
    """The final outcome a resolved or expired review gives its request; None while pending."""
    if review.state == reviews_module.PENDING:
        return None
    draft = review.draft
    checkpoints, checks, usage = draft_parts(draft)
    common = dict(
        strategy=draft.get("strategy", ""), usage=usage, policy_revision=review.policy_revision, review_id=review.id
    )
    who = review.reviewer
    if review.state == reviews_module.APPROVED:
        return Outcome(
            kind=OUTCOME_RELEASED, answer=draft.get("answer", ""), checkpoints=checkpoints, checks=checks,
            assurance=HUMAN_APPROVED, reason=f"released: the draft was approved by reviewer {who}", **common,
        )
    if review.state == reviews_module.EDITED:
        return Outcome(
            kind=OUTCOME_RELEASED, answer=review.answer, assurance=HUMAN_APPROVED,
            reason=f"released: the answer was written by reviewer {who}", **common,
        )
    if review.state == reviews_module.REJECTED:
        return Outcome(
            kind=OUTCOME_NO_ELIGIBLE_ANSWER, checks=checks,
            reason=f"not released: rejected by reviewer {who}" + (f" ({review.comment})" if review.comment else ""), **common,
        )
    # Expired: the tenant's on_timeout decides, and approves only a draft the gate allowed at
    # the route's minimum assurance (a high-impact draft is never released unreviewed).
    assurance = draft.get("assurance", "")
    enough = bool(assurance) and assurance_rank(assurance) >= assurance_rank(draft.get("min_assurance", UNVERIFIED))
    if review.resolution == "approve" and draft.get("answer") and enough:
        return Outcome(
            kind=OUTCOME_RELEASED, answer=draft["answer"], checkpoints=checkpoints, checks=checks,
            assurance=draft["assurance"],
            reason="released unreviewed: the review expired and the tenant's on_timeout approves the draft; "
            + _ASSURANCE_WORDS[draft["assurance"]],
            **common,
        )
    return Outcome(
        kind=OUTCOME_NO_ELIGIBLE_ANSWER, checks=checks,
        reason="not released: the review expired without a decision"
        + (
            " and the tenant's on_timeout rejects" if review.resolution != "approve"
            else "; on_timeout approves only a draft that meets the route's minimum assurance"
        ),
        **common,
    )
