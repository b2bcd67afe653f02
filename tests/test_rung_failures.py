"""A higher rung that fails never loses what a lower one found; the ladder shares one wall clock.

The router core runs with the real verifier core in process and a solver port that plays a
script: each rung either returns a result or raises the error a failing solver raises."""

from __future__ import annotations

import asyncio
import pathlib
import time
from dataclasses import replace

import pytest

from rmesh.domain import Candidate, CheckSpec, Checkpoint, TaskSpec, Usage
from rmesh.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from rmesh.router_svc.core import OUTCOME_NO_ELIGIBLE_ANSWER, OUTCOME_RELEASED, Outcome, RouterCore, RouterRequest
from rmesh.router_svc.policy.loader import load_policy
from rmesh.solving import CALL_DEADLINE, Progress, SolveRequest, SolveResult
from rmesh.verifier_svc.core import VerifierCore

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = load_policy(ROOT / "policy" / "tenants" / "demo.yaml")


class InProcessVerifier:
    def __init__(self) -> None:
        self.core = VerifierCore()

    async def precheck(self, task, evidence, required):
        return self.core.precheck(task, evidence, required)

    async def verify(self, task, evidence, required, candidates, *, problem="", learned="", aggregation="min"):
        verdicts, _ = await self.core.verify_scored(task, evidence, required, candidates, problem=problem, aggregation=aggregation)
        return verdicts


class ScriptedSolver:
    """Answers each rung from ``script``: an answer (verified for real) or an exception."""

    def __init__(self, script: dict, verifier: InProcessVerifier) -> None:
        self.script = script
        self.verifier = verifier
        self.requests: list[SolveRequest] = []

    async def solve(self, request: SolveRequest):
        self.requests.append(request)
        step = self.script[request.strategy]
        yield Progress("decoding", 2, 0, Usage(10, 0, 0), 0, 0)
        if isinstance(step, Exception):
            raise step
        candidate = Candidate("b0", (Checkpoint(f"The sum is {step}."),), "", step, True)
        (verdict,) = await self.verifier.verify(request.task, request.evidence, request.required_evidence, [candidate])
        yield SolveResult(candidate, verdict, Usage(10, 40, 0), "budget_exhausted", 2, verdict.release, request.strategy)


def arithmetic(expression: str = "9 + 8") -> RouterRequest:
    return RouterRequest(
        problem=f"What is {expression}?",
        task=TaskSpec(kind="rungs", checks=(CheckSpec("arithmetic", {"expression": expression}),)),
    )


async def run(script: dict, deadline: float | None = None) -> tuple[list, ScriptedSolver]:
    verifier = InProcessVerifier()
    solver = ScriptedSolver(script, verifier)
    core = RouterCore(verifier, solver)
    events = [event async for event in core.solve(DEMO, arithmetic(), "demo-caller", deadline)]
    return events, solver


@pytest.mark.parametrize(
    "error",
    [
        ResourceExhausted("request needs 93818880 KV bytes; the solver's whole budget is 75497472"),
        Unavailable("SGLang engine unreachable"),
        DeadlineExceeded("engine call exceeded the deadline"),
    ],
    ids=["resource", "engine", "deadline"],
)
async def test_a_failing_higher_rung_keeps_the_lower_rungs_result(error):
    """best_of_n finds a wrong answer, beam fails: the caller gets NO_ELIGIBLE_ANSWER with the
    best_of_n result and its next step, never the error."""
    events, solver = await run({"best_of_n": "16", "beam": error})
    assert [r.strategy for r in solver.requests] == ["best_of_n", "beam"]
    outcome = events[-1]
    assert isinstance(outcome, Outcome) and outcome.kind == OUTCOME_NO_ELIGIBLE_ANSWER
    assert outcome.strategy == "best_of_n" and outcome.next_step
    assert "failed checks arithmetic" in outcome.reason
    assert "beam stopped without a result (" in outcome.reason
    assert "93818880" not in outcome.reason and "SGLang" not in outcome.reason  # details stay in the log
    stages = [e.stage for e in events if isinstance(e, Progress)]
    assert "escalate best_of_n -> beam" in stages and "beam failed; keeping the best_of_n result" in stages
    # What the failed rung had spent before it failed is still counted.
    assert outcome.usage.completion_tokens == 40


async def test_an_error_on_the_first_rung_is_the_callers_status():
    with pytest.raises(ResourceExhausted):
        await run({"best_of_n": ResourceExhausted("no room")})


async def test_an_eligible_answer_from_a_higher_rung_is_released():
    events, _ = await run({"best_of_n": "16", "beam": "17"})
    assert events[-1].kind == OUTCOME_RELEASED and events[-1].answer == "17" and events[-1].strategy == "beam"


async def test_the_ladder_shares_one_wall_clock_and_keeps_time_for_the_gate():
    """Each rung gets the route's wall clock less what earlier rungs used, and never more than
    the caller's deadline less the time the release gate needs."""
    deadline = time.monotonic() + 30
    _, solver = await run({"best_of_n": "16", "beam": "17"}, deadline)
    walls = [r.budget.wall_clock_seconds for r in solver.requests]
    route_wall = DEMO.routes[0].budget.wall_clock_seconds
    assert route_wall > 30 and 0 < walls[1] <= walls[0] <= 30 - 2.0 + 0.01


class SlowSolver(ScriptedSolver):
    """best_of_n answers at once; beam runs until its call's deadline, as a round that started
    just before it would."""

    async def solve(self, request: SolveRequest):
        if request.strategy == "best_of_n":
            async for item in super().solve(request):
                yield item
            return
        self.requests.append(request)
        yield Progress("decoding", 6, 0, Usage(10, 0, 0), 0, 0)
        deadline = CALL_DEADLINE.get()
        self.beam_deadline = deadline
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        raise DeadlineExceeded("engine call exceeded the deadline")


async def test_a_rung_cut_off_at_its_deadline_leaves_the_gate_its_time():
    """The rung's call ends before the caller's deadline, so the lower rung's result is still
    gated and sent: the caller sees NO_ELIGIBLE_ANSWER, not DEADLINE_EXCEEDED."""
    verifier = InProcessVerifier()
    solver = SlowSolver({"best_of_n": "16"}, verifier)
    core = RouterCore(verifier, solver)
    deadline = time.monotonic() + 3.0
    token = CALL_DEADLINE.set(deadline)
    try:
        events = [event async for event in core.solve(DEMO, arithmetic(), "demo-caller", deadline)]
    finally:
        CALL_DEADLINE.reset(token)
    assert events[-1].kind == OUTCOME_NO_ELIGIBLE_ANSWER and events[-1].strategy == "best_of_n"
    assert "beam stopped without a result (its time ran out)" in events[-1].reason
    assert time.monotonic() < deadline and solver.beam_deadline <= deadline - 0.5


async def test_a_caller_deadline_past_an_hour_keeps_the_wall_clock_in_range():
    """A route without a wall clock and a caller with two hours: the solver is asked for at most
    the hour it accepts, not refused."""
    route = DEMO.routes[0]
    unbounded = replace(
        DEMO, revision="no-wall-clock",
        routes=(replace(route, budget=replace(route.budget, wall_clock_seconds=0)), *DEMO.routes[1:]),
    )
    verifier = InProcessVerifier()
    solver = ScriptedSolver({"best_of_n": "17"}, verifier)
    events = [e async for e in RouterCore(verifier, solver).solve(unbounded, arithmetic(), "demo-caller", time.monotonic() + 7200)]
    assert events[-1].kind == OUTCOME_RELEASED
    assert solver.requests[0].budget.wall_clock_seconds == 3600
