"""The search state every strategy drives: nodes, rounds, stop rules, KV accounting, tracing.

A *node* is a response, whole (``full`` mode: best_of_n, self_consistency, single_*) or partial
(``step`` mode: beam, mcts, where each expansion adds one checkpoint or the final answer).
``SearchState.expand`` is the one place the loop generates, verifies and traces: one engine
call per round (shared prefix, batched branches), one verifier call per round, one span per
round and per branch.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import trace

from rmesh.domain import Candidate, Usage, Verdict
from rmesh.engine import Engine, GenerationRequest, SamplingParams
from rmesh.solving import (
    STOP_BRANCH_CAP,
    STOP_ELIGIBLE_ANSWER,
    STOP_EXACT_CHECK_PASSED,
    STOP_TOKEN_CAP,
    STOP_WALL_CLOCK,
    Emit,
    Progress,
    SolveRequest,
    SolveResult,
    VerifierPort,
)
from rmesh.solver_svc.prompt import (
    RESPONSE_OPEN,
    answer_choices,
    build_grammar,
    build_step_grammar,
    parse_response,
    quotable,
)

# A round needs at least this many tokens per branch to be worth starting.
MIN_TOKENS_PER_BRANCH = 16
# Leave this much of the deadline for verifying and answering.
DEADLINE_MARGIN_SECONDS = 0.05


def normalise_state(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass(eq=False)
class Node:
    id: str
    parent: "Node | None"
    text: str
    depth: int
    finished: bool
    candidate: Candidate
    verdict: Verdict
    tokens: int = 0  # generated tokens on the path from the root
    logprob: float = 0.0  # of the step that made this node
    logprob_tokens: int | None = None  # the step's freely chosen tokens; None: all of them
    # The generated token ids from the root to here, where the engine reports them; None if not.
    path_ids: tuple[int, ...] | None = None
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    children: list["Node"] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.verdict.score

    @property
    def rank(self) -> tuple[bool, int, float, float]:
        # Exact checks outrank every score: an eligible candidate always beats an ineligible one;
        # a learned score only breaks ties left by the exact and evidence checks.
        learned = self.verdict.learned_score if self.verdict.learned_score is not None else 0.0
        return (self.verdict.release, self.verdict.checks_passed, self.verdict.score, learned)


Pruner = Callable[[list[Node]], dict[str, str]]


@dataclass
class SearchState:
    request: SolveRequest
    engine: Engine
    verifier: VerifierPort
    emit: Emit
    deadline: float  # hard: the caller's gRPC deadline
    wall_deadline: float  # soft: the budget's wall clock, checked between rounds
    numeric_answer: bool
    tracer: trace.Tracer
    live_cap: int  # branches alive at once, after the engine's limit and the KV budget
    prompt: str  # the request in the engine's chat template, the model's turn opened
    prompt_tokens: int
    learned_max_n: int = 0  # cap on samples when ranking by a calibrated learned score
    extractive_answer: bool = False
    expression_answer: bool = False
    usage: Usage = Usage()
    branches_started: int = 0
    branches_pruned: int = 0
    rounds: int = 0
    nodes: list[Node] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    best_history: list[float] = field(default_factory=list)
    peak_live: int = 0
    peak_kv_bytes: int = 0
    engine_seconds: float = 0.0

    # -- budget -------------------------------------------------------------------------------
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

    def stop_before_round(self, new_branches: int) -> str | None:
        """The stop rule that forbids a round of ``new_branches`` branches, if any."""
        if time.monotonic() >= min(self.wall_deadline, self.deadline - DEADLINE_MARGIN_SECONDS):
            return STOP_WALL_CLOCK
        if self.branches_started + new_branches > self.request.budget.max_branches:
            return STOP_BRANCH_CAP
        if self.tokens_left < MIN_TOKENS_PER_BRANCH * new_branches:
            return STOP_TOKEN_CAP
        return None

    def samples(self) -> int:
        """Samples for best_of_n / self_consistency: the request's N, capped by the largest N the
        learned scorer's calibration supports when ranking leans on it (reward over-optimisation)."""
        n = self.request.search.samples or self.request.budget.max_branches
        if self.request.search.learned_score and self.learned_max_n:
            n = min(n, self.learned_max_n)
        return n

    def temperature(self, default: float) -> float:
        chosen = self.request.search.temperature
        return default if chosen is None else chosen

    def forced_step(self, parent: Node | None) -> bool:
        """True when the next step can only be the verbatim citation of a required key."""
        depth = parent.depth if parent else 0
        evidence = self.request.evidence
        required = [k for k in self.request.required_evidence if k in evidence]
        return (
            depth < len(required)
            and depth + 1 < self.request.budget.max_depth
            and quotable(evidence[required[depth]])
        )

    def stalled(self) -> bool:
        """No improvement of the best score in the last k rounds (k from the search params)."""
        k = self.request.search.no_improvement_rounds
        if k <= 0 or len(self.best_history) <= k:
            return False
        return max(self.best_history[-k:]) <= self.best_history[-k - 1]

    # -- nodes --------------------------------------------------------------------------------
    def finished(self) -> list[Node]:
        return [n for n in self.nodes if n.finished]

    def best(self) -> Node | None:
        pool = self.finished() or self.nodes
        return max(pool, key=lambda n: n.rank, default=None)

    def eligible(self) -> list[Node]:
        return [n for n in self.nodes if n.finished and n.verdict.release]

    # -- one round ----------------------------------------------------------------------------
    async def expand(
        self,
        parents: list[Node | None],
        *,
        n: int,
        temperature: float,
        stage: str,
        step: bool,
        logprobs: bool = False,
        prune: Pruner | None = None,
    ) -> list[Node]:
        """Generate ``n`` children for each parent (None = the root) in one engine call, verify
        them in one verifier call, drop repeated states, apply ``prune``, trace and report."""
        request = self.request
        total = n * len(parents)
        per_branch = max(1, min(request.budget.max_tokens_per_branch, self.tokens_left // total))
        choices = answer_choices(request.task.checks)
        base = self.prompt
        generations = []
        for index, parent in enumerate(parents):
            if step:
                depth = parent.depth if parent else 0
                grammar = build_step_grammar(
                    request.evidence,
                    numeric_answer=self.numeric_answer,
                    required=request.required_evidence,
                    depth=depth,
                    must_finish=depth + 1 >= request.budget.max_depth,
                    extractive_answer=self.extractive_answer,
                    expression_answer=self.expression_answer,
                    choices=choices,
                )
                prompt = base + RESPONSE_OPEN + (parent.text if parent else "")
                prefix = base + RESPONSE_OPEN
                continuation = parent.path_ids if parent else ()
            else:
                grammar = build_grammar(
                    request.evidence,
                    numeric_answer=self.numeric_answer,
                    max_checkpoints=max(1, min(request.budget.max_depth, len(request.evidence) or 3)),
                    required=request.required_evidence,
                    extractive_answer=self.extractive_answer,
                    expression_answer=self.expression_answer,
                    choices=choices,
                )
                prompt = base
                prefix, continuation = None, None
            generations.append(
                GenerationRequest(
                    prompt=prompt,
                    n=n,
                    sampling=SamplingParams(
                        max_new_tokens=per_branch,
                        temperature=temperature,
                        seed=self.seed + self.branches_started + index * n,
                    ),
                    grammar=grammar,
                    deadline=self.deadline,
                    logprobs=logprobs,
                    prefix=prefix,
                    continuation_ids=continuation,
                    owner=request.tenant,
                )
            )
        first_id = self.branches_started
        self.branches_started += total
        self.rounds += 1
        # Before the engine runs: the caller learns what is in flight (its quota counts it).
        await self.report("decoding")
        with self.tracer.start_as_current_span(f"round {self.rounds} {stage}") as round_span:
            round_span.set_attributes({"rmesh.round.index": self.rounds, "rmesh.round.branches": total})
            started_ns = time.time_ns()
            started = time.monotonic()
            try:
                grouped = await self.engine.generate_many(generations)
            finally:
                self.engine_seconds += time.monotonic() - started
            generated_ns = time.time_ns()
            self._account_kv(parents, total, per_branch)
            children: list[tuple[Node, object]] = []
            pruned: dict[str, str] = {}
            branch_number = first_id
            for parent, results in zip(parents, grouped, strict=True):
                for result in results:
                    self.usage = self.usage + Usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
                    node = self._child(f"b{branch_number}", parent, result.text, result.completion_tokens, step)
                    node.logprob = result.logprob
                    node.logprob_tokens = result.logprob_tokens
                    if step and result.output_ids and (parent is None or parent.path_ids is not None):
                        node.path_ids = (parent.path_ids if parent else ()) + tuple(result.output_ids)
                    branch_number += 1
                    key = normalise_state(node.text)
                    if key in self.seen:
                        pruned[node.id] = "repeated_state"
                    self.seen.add(key)
                    children.append((node, result))
            verdicts = await self.verifier.verify(
                request.task,
                request.evidence,
                request.required_evidence,
                [c.candidate for c, _ in children],
                problem=request.problem,
                learned=request.search.learned_score,
                aggregation=request.search.aggregation,
            )
            for (node, _), verdict in zip(children, verdicts, strict=True):
                node.verdict = verdict
            fresh = [c for c, _ in children if c.id not in pruned]
            if prune:
                pruned.update(prune(fresh))
            for node, result in children:
                span = self.tracer.start_span(f"branch {node.id}", start_time=started_ns)
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "text_completion",
                        "gen_ai.request.model": self.engine.model_name,
                        "gen_ai.usage.input_tokens": result.prompt_tokens,
                        "gen_ai.usage.output_tokens": result.completion_tokens,
                        "rmesh.branch.id": node.id,
                        "rmesh.branch.parent": node.parent.id if node.parent else "root",
                        "rmesh.branch.depth": node.depth,
                        "rmesh.branch.cached_tokens": result.cached_tokens,
                        "rmesh.branch.finish_reason": result.finish_reason,
                        "rmesh.branch.finished": node.finished,
                        "rmesh.branch.well_formed": node.candidate.well_formed,
                        "rmesh.branch.score": node.verdict.score,
                        "rmesh.branch.eligible": node.verdict.release,
                        "rmesh.branch.checks_passed": node.verdict.checks_passed,
                        "rmesh.branch.pruned": node.id in pruned,
                        "rmesh.branch.prune_reason": pruned.get(node.id, ""),
                    }
                )
                span.end(end_time=generated_ns)
            round_span.set_attribute("rmesh.round.pruned", len(pruned))
        kept = [c for c, _ in children if c.id not in pruned]
        self.branches_pruned += len(pruned)
        for node in kept:
            if node.parent is not None:
                node.parent.children.append(node)
        self.nodes.extend(kept)
        best = self.best()
        self.best_history.append(best.score if best else 0.0)
        await self.report(stage)
        return kept

    def _child(self, node_id: str, parent: Node | None, generated: str, tokens: int, step: bool) -> Node:
        text = (parent.text if parent else "") + generated if step else generated
        full = RESPONSE_OPEN + text if step else text
        finished = "</response>" in full
        return Node(
            id=node_id,
            parent=parent,
            text=text,
            depth=(parent.depth if parent else 0) + 1,
            finished=finished,
            candidate=parse_response(node_id, full),
            verdict=Verdict(release=False),
            tokens=(parent.tokens if parent else 0) + tokens,
        )

    def _account_kv(self, parents: list[Node | None], live: int, per_branch: int) -> None:
        """Estimated KV bytes of this round: the prompt once, each parent's path once, each branch's new tokens."""
        paths = sum(p.tokens for p in parents if p is not None)
        cells = self.prompt_tokens + paths + live * per_branch
        self.peak_live = max(self.peak_live, live)
        self.peak_kv_bytes = max(self.peak_kv_bytes, cells * self.engine.kv_bytes_per_token)

    async def report(self, stage: str, stop_reason: str = "") -> None:
        best = self.best()
        await self.emit(
            Progress(
                stage=stage,
                branches_started=self.branches_started,
                branches_done=len(self.nodes) + self.branches_pruned,
                usage=self.usage,
                checks_passed=best.verdict.checks_passed if best else 0,
                checks_total=len(best.verdict.checks) if best else 0,
                round=self.rounds,
                best_score=best.score if best else 0.0,
                branches_pruned=self.branches_pruned,
                stop_reason=stop_reason,
            )
        )

    def result(self, strategy: str, stop_reason: str, chosen: Node | None = None, vote_share: float = 0.0) -> SolveResult:
        best = chosen or self.best()
        if stop_reason == STOP_EXACT_CHECK_PASSED and not self.request.task.checks:
            stop_reason = STOP_ELIGIBLE_ANSWER  # nothing was exactly checked: say what did stop it
        return SolveResult(
            best=best.candidate if best else None,
            verdict=best.verdict if best else None,
            usage=self.usage,
            stop_reason=stop_reason,
            candidates_evaluated=len(self.nodes) + self.branches_pruned,
            eligible=bool(best and best.finished and best.verdict.release),
            strategy=strategy,
            vote_share=vote_share,
            peak_live_branches=self.peak_live,
            peak_kv_bytes=self.peak_kv_bytes,
            engine_seconds=self.engine_seconds,
        )

