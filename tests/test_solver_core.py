"""Pure parts of the solver: selection, voting, PUCT priors, the KV ledger, step grammars."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from opentelemetry import trace

from rmesh.domain import Candidate, CheckResult, Verdict
from rmesh.errors import ResourceExhausted
from rmesh.mesh.in_process import InProcessVerifier
from rmesh.solver_svc.kv_budget import KVLedger
from rmesh.solver_svc.prompt import build_step_grammar
from rmesh.solver_svc.search import Node
from rmesh.solver_svc.strategies.mcts import puct, set_priors
from rmesh.solver_svc.strategies.self_consistency import normalise_answer, vote
from rmesh.verifier_svc.core import VerifierCore


def node(node_id: str, answer: str, release: bool, score: float, logprob: float = 0.0, tokens: int = 10) -> Node:
    verdict = Verdict(release=release, checks=(CheckResult("route_constraints", release),), score=score)
    return Node(node_id, None, "", 1, True, Candidate(node_id, final_answer=answer, well_formed=True), verdict, tokens=tokens, logprob=logprob)


def test_a_failing_exact_check_loses_to_a_lower_score_that_passes():
    """The seed's route example: 0.96 across the blocked bridge loses to 0.82 that passes."""
    bridge = node("a", "A-B-C via bridge", release=False, score=0.96)
    detour = node("b", "A-D-C", release=True, score=0.82)
    assert max([bridge, detour], key=lambda n: n.rank) is detour


def test_vote_prefers_an_eligible_minority_over_a_failing_majority():
    nodes = [node(f"w{i}", "41", False, 0.5) for i in range(3)] + [node(f"r{i}", "42", True, 0.9) for i in range(2)]
    chosen, share = vote(nodes)
    assert chosen.candidate.final_answer == "42"
    assert share == pytest.approx(0.4)


def test_vote_counts_equal_answers_written_differently():
    assert normalise_answer("42.") == normalise_answer(" 42 ") == normalise_answer("42.0")
    nodes = [node("a", "42.", False, 0.5), node("b", "42", False, 0.4), node("c", "7", False, 0.9)]
    chosen, share = vote(nodes)
    assert normalise_answer(chosen.candidate.final_answer) == "42" and share == pytest.approx(2 / 3)


def test_priors_follow_step_log_probabilities():
    likely, unlikely = node("a", "", False, 0, logprob=-2.0), node("b", "", False, 0, logprob=-20.0)
    set_priors([likely, unlikely])
    assert likely.prior > unlikely.prior and likely.prior + unlikely.prior == pytest.approx(1.0)
    assert puct(4, likely, 1.5) > puct(4, unlikely, 1.5)


def test_a_step_the_grammar_forced_does_not_get_the_highest_prior():
    """SGLang reports forced tokens as log-probability 0: a step made only of them says nothing
    about the model's preference, so it gets its siblings' average, not the top prior."""
    forced = node("f", "", False, 0, logprob=0.0)
    forced.logprob_tokens = 0
    chosen = node("c", "", False, 0, logprob=-1.0)
    chosen.logprob_tokens = 2  # -0.5 a token over the tokens the model chose
    weak = node("w", "", False, 0, logprob=-6.0)
    weak.logprob_tokens = 3  # -2.0 a token
    set_priors([forced, chosen, weak])
    assert chosen.prior > forced.prior > weak.prior
    assert sum(n.prior for n in (forced, chosen, weak)) == pytest.approx(1.0)


async def test_kv_ledger_waits_then_refuses_with_a_quota_violation():
    ledger = KVLedger(capacity_bytes=1000, wait_seconds=0.2)
    async with ledger.reserve(700):
        with pytest.raises(ResourceExhausted) as info:
            async with ledger.reserve(400):
                pass
        assert info.value.violations[0].subject == "solver:kv_bytes"
    async with ledger.reserve(400):
        assert ledger.in_use == 400
    assert ledger.in_use == 0


async def test_kv_ledger_admits_a_waiter_when_space_frees():
    ledger = KVLedger(capacity_bytes=1000, wait_seconds=2)
    release = asyncio.Event()

    async def holder():
        async with ledger.reserve(800):
            await release.wait()

    task = asyncio.create_task(holder())
    await asyncio.sleep(0.01)
    asyncio.get_running_loop().call_later(0.1, release.set)
    async with ledger.reserve(500):
        assert ledger.in_use == 500
    await task


def test_kv_ledger_refuses_at_once_what_can_never_fit():
    async def attempt():
        async with KVLedger(100, 10).reserve(101):
            pass

    with pytest.raises(ResourceExhausted):
        asyncio.run(attempt())


def test_step_grammar_forces_required_citations_then_allows_finishing():
    evidence = {"order": "Order 7.", "carrier": "ETA tomorrow."}
    first = build_step_grammar(evidence, numeric_answer=False, required=["order"], depth=0, must_finish=False)
    assert first.startswith('root ::= "<checkpoint cite=" "\\"order\\"" ">" "Order 7."')
    later = build_step_grammar(evidence, numeric_answer=False, required=["order"], depth=1, must_finish=False)
    assert later.startswith('root ::= checkpoint | summary answer "</response>"')
    capped = build_step_grammar(evidence, numeric_answer=False, required=["order"], depth=1, must_finish=True)
    assert capped.startswith('root ::= summary answer "</response>"')


class CountingVerifier(InProcessVerifier):
    """The real verifier core in process, counting the calls the solver makes to it."""

    def __init__(self) -> None:
        super().__init__(VerifierCore(), trace.get_tracer("test"))
        self.prechecks = 0
        self.verifies = 0

    async def precheck(self, task, evidence, required):
        self.prechecks += 1
        return await super().precheck(task, evidence, required)

    async def verify(self, task, evidence, required, candidates, **learned):
        self.verifies += 1
        return await super().verify(task, evidence, required, candidates, **learned)


async def test_a_precheck_from_the_caller_saves_the_solver_its_own():
    from rmesh.domain import Budget, CheckSpec, Precheck, TaskSpec
    from rmesh.engine.instant import InstantEngine
    from rmesh.solver_svc.core import SolverCore
    from rmesh.solving import SolveRequest

    verifier = CountingVerifier()
    solver = SolverCore(InstantEngine(), verifier)
    task = TaskSpec("sum", (CheckSpec("arithmetic", {"expression": "2 + 3"}),))
    request = SolveRequest("What is 2 + 3?", task, budget=Budget(max_tokens=300, max_branches=2, max_depth=2, wall_clock_seconds=10, max_tokens_per_branch=100))

    async def ignore(_event):
        return None

    alone = await solver.solve(request, ignore)
    assert (verifier.prechecks, alone.eligible) == (1, True)
    shape = Precheck(missing_evidence=(), next_step="", numeric_answer=True)
    given = await solver.solve(replace(request, precheck=shape), ignore)
    assert (verifier.prechecks, given.eligible) == (1, True)  # no second precheck
    assert verifier.verifies == 2
