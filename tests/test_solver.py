"""The solver over real gRPC with the real model: strategies, stop rules, KV budgets, bad input."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import SETTINGS, inner_channel
from rmesh import convert
from rmesh.api.solver.v1 import solver_pb2_grpc
from rmesh.config import ServerSettings
from rmesh.domain import Budget, CheckSpec, SearchParams, TaskSpec
from rmesh.solver_svc.serve import start_solver
from rmesh.solving import SolveRequest
from rmesh.telemetry import tracer_provider

FULFILLMENT_EVIDENCE = {
    "order": "Order 1042: laptop, monitor stand and cable, express; the stand was delivered.",
    "carrier": "Laptop and cable are at the regional hub; estimated delivery tomorrow.",
    "return_policy": "Opened accessories such as stands may be returned within 30 days.",
}


def arithmetic(expression: str, strategy: str, budget: Budget, search: SearchParams = SearchParams()) -> SolveRequest:
    """A request under a tenant of its own. The engine reuses KV only within a tenant, and a
    prompt copied from another test's call is not bit-identical to one read afresh, so sampled
    text would depend on which tests ran before this one in the shared session."""
    return SolveRequest(
        problem=f"What is {expression}?",
        task=TaskSpec("arithmetic", (CheckSpec("arithmetic", {"expression": expression}),)),
        strategy=strategy,
        budget=budget,
        search=search,
        tenant=f"test-{uuid.uuid4().hex[:12]}",
    )


async def solve(address: str, request: SolveRequest, timeout: float = 120):
    async with inner_channel(address) as channel:
        stub = solver_pb2_grpc.SolverServiceStub(channel)
        messages = [m async for m in stub.Solve(convert.solve_request_to_proto(request), timeout=timeout)]
    progress = [m.progress for m in messages if m.HasField("progress")]
    assert messages[-1].HasField("result")
    return progress, messages[-1].result


async def invalid(mesh, request: SolveRequest) -> str:
    jobs = mesh.engine.stats.jobs_started
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await solve(mesh.address("solver"), request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert mesh.engine.stats.jobs_started == jobs, "bad input must be refused before any engine call"
    return info.value.details()


# -- bad input, refused before any engine call ----------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (arithmetic("1 + 1", "tree_of_everything", Budget()), "strategy:"),
        (arithmetic("1 + 1", "best_of_n", Budget(max_branches=0)), "budget.max_branches:"),
        (arithmetic("1 + 1", "beam", Budget(max_depth=10**6)), "budget.max_depth:"),
        (arithmetic("1 + 1", "beam", Budget(max_branches=4), SearchParams(beam_width=5)), "search.beam_width:"),
        (arithmetic("1 + 1", "best_of_n", Budget(max_tokens=-5)), "budget.max_tokens:"),
        (arithmetic("1 + 1", "mcts", Budget(), SearchParams(exploration=-1)), "search.exploration:"),
    ],
)
async def test_bad_budgets_are_invalid_argument_naming_the_field(mesh, request_, field):
    details = await invalid(mesh, request_)
    assert details.startswith(field), details


async def test_kv_budget_smaller_than_the_prompt_is_refused(mesh):
    details = await invalid(mesh, arithmetic("1 + 1", "best_of_n", Budget(max_kv_bytes=18432 * 10)))
    assert details.startswith("budget.max_kv_bytes:") and "smaller than the prompt" in details


# -- strategies and stop rules -------------------------------------------------------------------


async def test_exact_check_passed_stops_best_of_n_at_the_first_passing_batch(mesh):
    """Greedy first, then batches of 2, 4, ...: the search ends with the batch that holds the
    first answer passing every check (its number and its stated steps), drawing no more."""
    progress, result = await solve(mesh.address("solver"), arithmetic("10 + 5", "best_of_n", Budget(1600, 8, 4, 60, 120)))
    assert result.eligible and result.best.final_answer == "15"
    assert result.stop_reason == "exact_check_passed"
    assert result.candidates_evaluated in (1, 3, 7) and result.candidates_evaluated < 8
    assert [p.branches_started for p in progress if p.stage == "decoding"] == [1, 3, 7][: len([p for p in progress if p.stage == "decoding"])]
    assert progress[-1].stop_reason == "exact_check_passed"


async def test_token_cap_stops_before_a_round_it_cannot_afford(mesh):
    _, result = await solve(mesh.address("solver"), arithmetic("9 + 8 + 2", "best_of_n", Budget(100, 8, 4, 60, 120)))
    assert result.stop_reason == "token_cap"
    assert result.usage.completion_tokens <= 100


async def test_branch_cap_stops_beam_search(mesh):
    _, result = await solve(
        mesh.address("solver"),
        arithmetic("9 + 8 + 2", "beam", Budget(2000, 3, 4, 60, 60), SearchParams(beam_width=1, branching_factor=3)),
    )
    assert result.stop_reason == "branch_cap"
    assert result.candidates_evaluated <= 3


async def test_depth_cap_forces_single_path_to_finish(mesh):
    _, result = await solve(mesh.address("solver"), arithmetic("9 + 8 + 2", "single_path", Budget(2000, 4, 1, 60, 80)))
    assert result.stop_reason == "depth_cap"
    assert len(result.best.checkpoints) == 0 and result.best.final_answer


async def test_repeated_states_are_pruned(mesh):
    """Greedy children of one node are identical: all but the first are pruned as repeats."""
    progress, result = await solve(
        mesh.address("solver"),
        arithmetic("9 + 8 + 2", "beam", Budget(2000, 30, 3, 60, 60), SearchParams(beam_width=3, branching_factor=3, temperature=0.0)),
    )
    first_round = next(p for p in progress if p.stage != "decoding")
    assert first_round.branches_started == 3
    assert first_round.branches_pruned == 2
    assert result.candidates_evaluated == progress[-1].branches_done


async def test_no_improvement_stops_mcts(mesh):
    _, result = await solve(
        mesh.address("solver"),
        arithmetic("9 + 8 + 2", "mcts", Budget(3000, 40, 4, 60, 60), SearchParams(branching_factor=2, no_improvement_rounds=1)),
    )
    assert result.stop_reason == "no_improvement"


async def test_wall_clock_budget_ends_the_search_between_rounds(mesh):
    _, result = await solve(
        mesh.address("solver"),
        arithmetic("9 + 8 + 2", "beam", Budget(3000, 40, 4, 0.2, 60), SearchParams(beam_width=2, branching_factor=2)),
    )
    assert result.stop_reason == "wall_clock"


async def test_self_consistency_reports_the_vote_share(mesh):
    _, result = await solve(
        mesh.address("solver"), arithmetic("3 + 4", "self_consistency", Budget(1200, 4, 4, 60, 120), SearchParams(samples=4))
    )
    assert result.candidates_evaluated == 4
    assert 0.25 <= result.vote_share <= 1.0
    if result.eligible:
        assert result.best.final_answer == "7"


async def test_mcts_and_beam_never_select_a_candidate_that_fails_the_check(mesh):
    for strategy in ("beam", "mcts"):
        _, result = await solve(
            mesh.address("solver"),
            arithmetic("6 * 7 - 5", strategy, Budget(2000, 24, 4, 60, 80), SearchParams(beam_width=2, branching_factor=3)),
        )
        if result.eligible:
            assert result.best.final_answer == "37"
            assert all(c.passed for c in result.verdict.checks)
        else:
            assert not result.verdict.release


# -- prefix reuse and KV -------------------------------------------------------------------------


async def test_branches_report_cached_prefix_tokens(mesh):
    _, result = await solve(
        mesh.address("solver"), arithmetic("9 + 8 + 2", "self_consistency", Budget(1200, 4, 4, 60, 60), SearchParams(samples=4))
    )
    # Four branches of one prompt: three of them take the whole prompt from the shared copy.
    assert result.usage.cached_tokens >= 3 * result.usage.prompt_tokens // 4


async def test_max_kv_bytes_caps_live_branches(mesh):
    per_token = mesh.engine.kv_bytes_per_token
    prompt_tokens = 300  # the arithmetic prompt is a little under this
    budget = Budget(1200, 6, 4, 60, 50, max_kv_bytes=per_token * (prompt_tokens + 2 * 50))
    _, result = await solve(
        mesh.address("solver"), arithmetic("9 + 8 + 2", "self_consistency", budget, SearchParams(samples=6))
    )
    assert result.candidates_evaluated == 6
    assert result.peak_live_branches == 2
    assert result.peak_kv_bytes <= budget.max_kv_bytes


async def test_process_kv_budget_refuses_with_a_quota_detail(mesh):
    """Two requests that each need most of a small solver's KV budget: the second waits, then
    gets RESOURCE_EXHAUSTED with a google.rpc.QuotaFailure naming the KV budget."""
    per_token = mesh.engine.kv_bytes_per_token
    provider = tracer_provider("rmesh-solver-small", {})
    service = await start_solver(
        "127.0.0.1:0",
        SETTINGS,
        provider,
        mesh.address("verifier"),
        mesh.engine,
        own_engine=False,
        kv_budget_bytes=per_token * 900,
        kv_wait_seconds=0.3,
    )
    try:
        address = f"127.0.0.1:{service.port}"
        request = arithmetic("9 + 8 + 2", "best_of_n", Budget(400, 4, 4, 60, 120))
        outcomes = await asyncio.gather(solve(address, request), solve(address, request), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(errors) == 1, outcomes
        error = errors[0]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error)
        detail = error_details_pb2.QuotaFailure()
        assert status.details[0].Unpack(detail)
        assert detail.violations[0].subject == "solver:kv_bytes"
    finally:
        await service.stop(1)


# -- tracing ---------------------------------------------------------------------------------------


async def test_a_beam_trace_shows_the_tree(mesh):
    mesh.spans.clear()
    await solve(
        mesh.address("solver"),
        arithmetic("6 * 7 - 5", "beam", Budget(2000, 24, 3, 60, 60), SearchParams(beam_width=2, branching_factor=2)),
    )
    branches = [s for s in mesh.spans.get_finished_spans() if s.name.startswith("branch ")]
    ids = {s.attributes["rmesh.branch.id"] for s in branches}
    parents = {s.attributes["rmesh.branch.parent"] for s in branches}
    assert "root" in parents
    assert parents - {"root"} and parents - {"root"} <= ids, "children name parents that are branches of the same tree"
    depths = {s.attributes["rmesh.branch.depth"] for s in branches}
    assert depths >= {1, 2}
    rounds = [s for s in mesh.spans.get_finished_spans() if s.name.startswith("round ")]
    assert all(s.attributes["rmesh.round.branches"] >= 1 for s in rounds)


async def test_a_search_wider_than_the_whole_kv_budget_runs_narrower_instead_of_failing(mesh):
    """Four self-consistency samples of 120 tokens would need more KV than a small solver has at
    all: it runs two at a time, says so in a progress event, and still evaluates all four."""
    per_token = mesh.engine.kv_bytes_per_token
    provider = tracer_provider("rmesh-solver-fit", {})
    service = await start_solver(
        "127.0.0.1:0", SETTINGS, provider, mesh.address("verifier"), mesh.engine, own_engine=False,
        kv_budget_bytes=per_token * (300 + 2 * 120 + 60), kv_wait_seconds=0.3,
    )
    try:
        request = arithmetic("9 + 8 + 2", "self_consistency", Budget(1200, 4, 4, 60, 120), SearchParams(samples=4))
        progress, result = await solve(f"127.0.0.1:{service.port}", request)
        fitted = [p.stage for p in progress if p.stage.startswith("fit to KV")]
        assert fitted and fitted[0].startswith("fit to KV: at most 2 branches alive at once instead of 4"), [p.stage for p in progress]
        assert result.candidates_evaluated == 4 and result.peak_live_branches == 2
    finally:
        await service.stop(1)


async def test_a_kv_budget_too_small_for_one_branch_names_the_smallest_that_fits(mesh):
    per_token = mesh.engine.kv_bytes_per_token
    details = await invalid(mesh, arithmetic("2 + 3", "best_of_n", Budget(400, 2, 1, 60, 100, max_kv_bytes=per_token * 320)))
    assert details.startswith("budget.max_kv_bytes:") and "the smallest budget that fits one" in details
    smallest = int(details.rsplit(" ", 1)[1])
    _, result = await solve(mesh.address("solver"), arithmetic("2 + 3", "best_of_n", Budget(400, 2, 1, 60, 100, max_kv_bytes=smallest)))
    assert result.peak_live_branches == 1
