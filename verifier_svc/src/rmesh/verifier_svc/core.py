"""The verifier core: validates tasks, runs exact checkers, enforces the evidence contract.

Exact checks are authoritative. The score only ranks candidates that the checks and the
evidence contract already allow; it never releases anything on its own.
"""

from __future__ import annotations

import re

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rmesh.domain import (
    NEXT_STEP_CITE_EVIDENCE,
    NEXT_STEP_MORE_COMPUTE,
    NEXT_STEP_REQUEST_TOOL_DATA,
    Candidate,
    CheckResult,
    Precheck,
    TaskSpec,
    Verdict,
    verifies_answer,
)
from rmesh.errors import FailedPrecondition, InvalidRequest
from rmesh.verifier_svc.checkers import REGISTRY, ExactChecker
from rmesh.verifier_svc.checkers.arithmetic import ExpressionError, evaluate
from rmesh.verifier_svc.sandbox import CALL_DEADLINE
from rmesh.verifier_svc.scorers import AGGREGATIONS, Calibration, Scorer, aggregate


@dataclass(frozen=True)
class PreparedCheck:
    checker: ExactChecker
    prepared: Any


MAX_CANDIDATES = 256
MAX_CHECKS = 32
# Sandboxed runs (candidates x checks that run code) one Verify call may ask for.
MAX_SANDBOX_RUNS = 32
# Up to this much candidate text, non-blocking checks run on the event loop.
INLINE_TEXT_CHARS = 20_000
MAX_CHECKPOINTS = 64
MAX_TEXT_CHARS = 100_000


def check_candidate_sizes(candidates: Sequence[Candidate]) -> None:
    """Refuse oversized batches and fields by name, before any checker runs."""
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidRequest("candidates", f"{len(candidates)} candidates; at most {MAX_CANDIDATES} per call")
    for i, c in enumerate(candidates):
        if len(c.checkpoints) > MAX_CHECKPOINTS:
            raise InvalidRequest(f"candidates[{i}].checkpoints", f"more than {MAX_CHECKPOINTS}")
        for name, text in (("final_answer", c.final_answer), ("verification_summary", c.verification_summary)):
            if len(text) > MAX_TEXT_CHARS:
                raise InvalidRequest(f"candidates[{i}].{name}", f"longer than {MAX_TEXT_CHARS} characters")
        for j, cp in enumerate(c.checkpoints):
            if len(cp.text) > MAX_TEXT_CHARS:
                raise InvalidRequest(f"candidates[{i}].checkpoints[{j}].text", f"longer than {MAX_TEXT_CHARS} characters")


LEARNED_NONE = ""
LEARNED_OUTCOME = "outcome"
LEARNED_PROCESS = "process"


@dataclass(frozen=True)
class ScoringInfo:
    scorer: str = ""
    calibrated: bool = False
    release_threshold: float = 0.0
    max_n: int = 0


class VerifierCore:
    def __init__(
        self,
        registry: Mapping[str, ExactChecker] | None = None,
        scorer: Scorer | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self._registry = dict(REGISTRY if registry is None else registry)
        self.scorer = scorer
        self.calibration = calibration if scorer is not None else None

    async def verify_scored(
        self,
        task: TaskSpec,
        evidence: Mapping[str, str],
        required: Sequence[str],
        candidates: Sequence[Candidate],
        *,
        problem: str = "",
        learned: str = LEARNED_NONE,
        aggregation: str = "min",
        deadline: float | None = None,
    ) -> tuple[list[Verdict], ScoringInfo]:
        """Exact verdicts (in a worker thread: checkers may run sandboxed code), then, when asked,
        a learned score per candidate in one batched scorer call.

        A calibrated threshold gates release only for tasks with no check of the answer itself
        (format checks alone do not count); otherwise the learned score only ranks."""
        if learned and aggregation not in AGGREGATIONS:
            aggregate([], aggregation)  # raises InvalidRequest naming the field
        if self.blocking(task, candidates):
            verdicts = await asyncio.to_thread(self.verify, task, evidence, required, candidates, deadline)
        else:
            verdicts = self.verify(task, evidence, required, candidates, deadline)
        if not learned:
            return verdicts, ScoringInfo()
        if self.scorer is None:
            raise FailedPrecondition("learned_score: this verifier has no learned scorer configured (RMESH_JUDGE)")
        if learned == LEARNED_OUTCOME:
            scores = await self.scorer.outcome(problem, candidates)
            steps: list[list[float]] = [[] for _ in candidates]
        else:
            steps = await self.scorer.process(problem, candidates)
            scores = [aggregate(s, aggregation) for s in steps]
        calibration = self.calibration
        gate = calibration is not None and not verifies_answer(task)
        scored = []
        for verdict, score, step in zip(verdicts, scores, steps, strict=True):
            release = verdict.release and (not gate or score >= calibration.threshold)
            scored.append(
                replace(
                    verdict,
                    release=release,
                    learned_score=round(float(score), 6),
                    learned_step_scores=tuple(round(float(x), 6) for x in step),
                    next_step=verdict.next_step or ("" if release else NEXT_STEP_MORE_COMPUTE),
                )
            )
        info = ScoringInfo(
            scorer=self.scorer.name,
            calibrated=calibration is not None,
            release_threshold=calibration.threshold if calibration else 0.0,
            max_n=calibration.max_n if calibration else 0,
        )
        return scored, info

    def blocking(self, task: TaskSpec, candidates: Sequence[Candidate] = ()) -> bool:
        """Whether verifying would hold the event loop for long: a blocking checker, or much text
        (regex and schema checks are linear in the answer, and there may be 256 answers)."""
        text = sum(
            len(c.final_answer) + len(c.verification_summary) + sum(len(cp.text) for cp in c.checkpoints)
            for c in candidates
        )
        return text > INLINE_TEXT_CHARS or any(
            getattr(self._registry.get(spec.name), "blocking", True) for spec in task.checks
        )

    @property
    def checker_names(self) -> list[str]:
        return sorted(self._registry)

    def prepare(self, task: TaskSpec) -> list[PreparedCheck]:
        """Resolve and validate every check; raise InvalidRequest naming the field."""
        if len(task.checks) > MAX_CHECKS:
            raise InvalidRequest("task.checks", f"more than {MAX_CHECKS} checks")
        prepared = []
        for index, spec in enumerate(task.checks):
            checker = self._registry.get(spec.name)
            if checker is None:
                known = ", ".join(self.checker_names)
                raise InvalidRequest(
                    f"task.checks[{index}].name", f"unknown checker {spec.name[:64]!r}; known: {known}"
                )
            prepared.append(PreparedCheck(checker, checker.prepare(spec.params, f"task.checks[{index}].params")))
        return prepared

    def precheck(
        self, task: TaskSpec, evidence: Mapping[str, str], required: Sequence[str]
    ) -> Precheck:
        checks = self.prepare(task)
        missing = tuple(key for key in required if key not in evidence)
        return Precheck(
            missing_evidence=missing,
            next_step=NEXT_STEP_REQUEST_TOOL_DATA if missing else "",
            numeric_answer=any(c.checker.numeric_answer for c in checks),
            expression_answer=any(c.checker.expression_answer for c in checks),
            learned_scorer=self.scorer.name if self.scorer else "",
            learned_max_n=self.calibration.max_n if self.calibration else 0,
        )

    def verify(
        self,
        task: TaskSpec,
        evidence: Mapping[str, str],
        required: Sequence[str],
        candidates: Sequence[Candidate],
        deadline: float | None = None,
    ) -> list[Verdict]:
        """Judge every candidate; sandboxed checks stop at ``deadline`` (monotonic)."""
        check_candidate_sizes(candidates)
        checks = self.prepare(task)
        runs = len(candidates) * sum(1 for c in checks if getattr(c.checker, "sandboxed", False))
        if runs > MAX_SANDBOX_RUNS:
            raise InvalidRequest(
                "candidates", f"{runs} sandboxed runs (candidates x code checks); at most {MAX_SANDBOX_RUNS} per call"
            )
        token = CALL_DEADLINE.set(deadline)
        try:
            return [self._judge(c, checks, evidence, required) for c in candidates]
        finally:
            CALL_DEADLINE.reset(token)

    def _judge(
        self,
        candidate: Candidate,
        checks: list[PreparedCheck],
        evidence: Mapping[str, str],
        required: Sequence[str],
    ) -> Verdict:
        missing = tuple(key for key in required if key not in evidence)
        cited = candidate.cited_keys
        unknown = tuple(sorted(key for key in cited if key not in evidence))
        uncited = tuple(key for key in required if key in evidence and key not in cited)
        ungrounded = ungrounded_claims(candidate, evidence) if evidence else ()
        results: list[CheckResult] = []
        if not candidate.final_answer.strip():
            results.append(CheckResult("final_answer", False, "candidate has no final answer"))
        results.extend(c.checker.check(candidate.final_answer, c.prepared) for c in checks)
        steps = step_scores(candidate, evidence)
        # A released answer shows its checkpoints: one that states an equation the verifier
        # recomputes as false keeps the answer from release, whatever the final number.
        false = [i for i, (cp, score) in enumerate(zip(candidate.checkpoints, steps)) if score == 0.0 and not cp.cites]
        if false:
            shown = candidate.checkpoints[false[0]].text[:80]
            results.append(CheckResult("steps", False, f"checkpoint {false[0] + 1} states a false equation: {shown}"))
        exact_ok = all(r.passed for r in results)
        grounded = not missing and not unknown and not uncited and not ungrounded and candidate.well_formed
        release = exact_ok and grounded
        if missing:
            next_step = NEXT_STEP_REQUEST_TOOL_DATA
        elif not exact_ok:
            next_step = NEXT_STEP_MORE_COMPUTE
        elif not grounded:
            next_step = NEXT_STEP_CITE_EVIDENCE
        else:
            next_step = ""
        return Verdict(
            release=release,
            missing_evidence=missing,
            unknown_citations=unknown,
            uncited_required=uncited,
            ungrounded_claims=ungrounded,
            step_scores=steps,
            checks=tuple(results),
            next_step=next_step,
            score=_rank_score(candidate, results, steps, required, cited, unknown + ungrounded),
        )


_NUMBER_OR_DATE = re.compile(r"\d+(?:[.,:/-]\d+)*")


def _evidence_values(evidence: Mapping[str, str]) -> dict[str, frozenset[str]]:
    """The numbers and dates in each evidence value, found once (a set: lookups stay constant
    however long the evidence and however many numbers a candidate states)."""
    return {key: frozenset(_NUMBER_OR_DATE.findall(value)) for key, value in evidence.items()}


def ungrounded_claims(candidate: Candidate, evidence: Mapping[str, str]) -> tuple[str, ...]:
    """Numbers and dates the candidate states that its cited evidence does not contain.

    A checkpoint is held to the values it cites; the final answer and the summary to every
    value the candidate cites. Evidence is only searched, never interpreted.
    """
    values = _evidence_values(evidence)

    def grounded_in(token: str, keys) -> bool:
        return any(token in values.get(k, ()) for k in keys)

    claims: list[str] = []
    for cp in candidate.checkpoints:
        claims += [t for t in _NUMBER_OR_DATE.findall(cp.text) if not grounded_in(t, cp.cites)]
    all_cited = candidate.cited_keys
    for text in (candidate.verification_summary, candidate.final_answer):
        claims += [t for t in _NUMBER_OR_DATE.findall(text) if not grounded_in(t, all_cited)]
    return tuple(dict.fromkeys(claims))


def step_scores(candidate: Candidate, evidence: Mapping[str, str]) -> tuple[float, ...]:
    """An exact process score per checkpoint: 1 valid, 0 invalid, 0.5 where nothing can judge it.

    A step that states an equation ("6 * 7 = 42") is recomputed; a step that cites evidence
    must cite keys the request carries and state only numbers those values contain.
    """
    scores = []
    values = _evidence_values(evidence)
    for cp in candidate.checkpoints:
        if cp.cites:
            known = all(k in evidence for k in cp.cites)
            grounded = all(
                any(t in values.get(k, ()) for k in cp.cites)
                for t in _NUMBER_OR_DATE.findall(cp.text)
            )
            scores.append(1.0 if known and grounded else 0.0)
        else:
            scores.append(equation_score(cp.text))
    return tuple(scores)


def equation_score(text: str) -> float:
    sides = [side.strip().rstrip(".") for side in text.split("=")]
    if len(sides) < 2 or not all(sides):
        return 0.5
    try:
        values = [evaluate(side) for side in sides]
    except ExpressionError:
        return 0.5
    return 1.0 if all(v == values[0] for v in values) else 0.0


def _rank_score(
    candidate: Candidate,
    results: list[CheckResult],
    steps: tuple[float, ...],
    required: Sequence[str],
    cited: set[str],
    problems: tuple[str, ...],
) -> float:
    """Order candidates: exact checks first, then valid steps and citation coverage, then form."""
    check_share = sum(r.passed for r in results) / len(results) if results else 1.0
    step_share = sum(steps) / len(steps) if steps else 0.5
    coverage = sum(1 for k in required if k in cited) / len(required) if required else 1.0
    citation_penalty = 0.5 if problems else 1.0
    form = 1.0 if candidate.well_formed else 0.0
    return round(0.5 * check_share + 0.2 * step_share + 0.2 * coverage * citation_penalty + 0.1 * form, 6)
