"""One round of search: generate branches, parse, verify in one batch, trace every branch.

Every strategy goes through ``SearchState.round``; that is the one place the search loop
creates spans, so a trace of any strategy shows each branch with its tokens and verdict.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from opentelemetry import trace

from rmesh.domain import Candidate, Usage, Verdict
from rmesh.engine import Engine, GenerationRequest, SamplingParams
from rmesh.solver_svc.model import Emit, Progress, SolveRequest, SolveResult, VerifierPort
from rmesh.solver_svc.prompt import build_grammar, build_prompt, parse_response

@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    verdict: Verdict

    @property
    def rank(self) -> tuple[bool, int, float]:
        # Exact checks outrank every score: an eligible candidate always beats an ineligible one.
        return (self.verdict.release, self.verdict.checks_passed, self.verdict.score)


@dataclass
class SearchState:
    request: SolveRequest
    engine: Engine
    verifier: VerifierPort
    emit: Emit
    deadline: float
    numeric_answer: bool
    tracer: trace.Tracer
    extractive_answer: bool = False
    usage: Usage = Usage()
    branches_started: int = 0
    scored: list[Scored] = field(default_factory=list)

    @property
    def seed(self) -> int:
        # Without an explicit seed the same request samples the same branches: reproducible.
        if self.request.seed:
            return self.request.seed
        digest = hashlib.sha256(self.request.problem.encode())
        for key, value in sorted(self.request.evidence.items()):
            digest.update(f"\0{key}\0{value}".encode())
        return int.from_bytes(digest.digest()[:4], "big") or 1

    @property
    def tokens_left(self) -> int:
        return self.request.budget.max_tokens - self.usage.completion_tokens

    def best(self) -> Scored | None:
        return max(self.scored, key=lambda s: s.rank, default=None)

    async def round(self, *, n: int, temperature: float, stage: str) -> list[Scored]:
        """Generate ``n`` branches from the shared prompt, verify them together, report progress."""
        request = self.request
        per_branch = min(request.budget.max_tokens_per_branch, max(1, self.tokens_left // n))
        grammar = build_grammar(
            request.evidence,
            numeric_answer=self.numeric_answer,
            max_checkpoints=max(1, min(request.budget.max_depth, len(request.evidence) or 3)),
            required=request.required_evidence,
            extractive_answer=self.extractive_answer,
        )
        generation = GenerationRequest(
            prompt=build_prompt(request.problem, request.evidence, self.numeric_answer, self.extractive_answer),
            n=n,
            sampling=SamplingParams(
                max_new_tokens=per_branch,
                temperature=temperature,
                seed=self.seed + self.branches_started,
            ),
            grammar=grammar,
            deadline=self.deadline,
        )
        first_id = self.branches_started
        self.branches_started += n
        with self.tracer.start_as_current_span(f"round {stage}") as round_span:
            round_span.set_attribute("rmesh.round.branches", n)
            started_ns = time.time_ns()
            branches = await self.engine.generate(generation)
            generated_ns = time.time_ns()
            candidates = [parse_response(f"b{first_id + i}", b.text) for i, b in enumerate(branches)]
            verdicts = await self.verifier.verify(
                request.task, request.evidence, request.required_evidence, candidates
            )
            scored = [Scored(c, v) for c, v in zip(candidates, verdicts, strict=True)]
            for index, (branch, item) in enumerate(zip(branches, scored)):
                span = self.tracer.start_span(f"branch {item.candidate.id}", start_time=started_ns)
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "text_completion",
                        "gen_ai.request.model": self.engine.model_name,
                        "gen_ai.usage.input_tokens": branch.prompt_tokens,
                        "gen_ai.usage.output_tokens": branch.completion_tokens,
                        "rmesh.branch.index": first_id + index,
                        "rmesh.branch.cached_tokens": branch.cached_tokens,
                        "rmesh.branch.finish_reason": branch.finish_reason,
                        "rmesh.branch.well_formed": item.candidate.well_formed,
                        "rmesh.branch.score": item.verdict.score,
                        "rmesh.branch.eligible": item.verdict.release,
                        "rmesh.branch.checks_passed": item.verdict.checks_passed,
                    }
                )
                span.end(end_time=generated_ns)
            for branch in branches:
                self.usage = self.usage + Usage(branch.prompt_tokens, branch.completion_tokens, branch.cached_tokens)
            round_span.set_attribute("rmesh.round.completion_tokens", sum(b.completion_tokens for b in branches))
        self.scored.extend(scored)
        best = self.best()
        await self.emit(
            Progress(
                stage=stage,
                branches_started=self.branches_started,
                branches_done=len(self.scored),
                usage=self.usage,
                checks_passed=best.verdict.checks_passed if best else 0,
                checks_total=len(best.verdict.checks) if best else 0,
            )
        )
        return scored

    def result(self, strategy: str, stop_reason: str) -> SolveResult:
        best = self.best()
        return SolveResult(
            best=best.candidate if best else None,
            verdict=best.verdict if best else None,
            usage=self.usage,
            stop_reason=stop_reason,
            candidates_evaluated=len(self.scored),
            eligible=bool(best and best.verdict.release),
            strategy=strategy,
        )
