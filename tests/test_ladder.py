"""Compute-optimal escalation: the prior picks the starting rung; failures climb the ladder."""

from __future__ import annotations


from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
import random
from collections import Counter

import pytest

from rmesh.router_svc.ladder import (
    EXPLORE_SHARE,
    MIN_ATTEMPTS,
    OPTIMISM,
    POOL_WEIGHT,
    Attempt,
    Reading,
    best_of_n_samples,
    beta_quantile,
    climb_cost,
    plan,
    rung_stats,
    samples_for,
)

LADDER = ("single_pass", "best_of_n", "beam")


def attempts(rung: str, passed: int, failed: int, tokens: int = 100, samples: int = 1) -> list[Attempt]:
    return [Attempt(rung, True, tokens, samples)] * passed + [Attempt(rung, False, tokens, samples)] * failed


def starts(ladder, history, draws: int = 400, **kwargs) -> Counter:
    rng = random.Random(7)
    return Counter(plan(ladder, history, rng=rng, **kwargs).start for _ in range(draws))


def test_no_history_starts_cheap():
    fresh = plan(LADDER, [])
    assert fresh.start == 0 and fresh.last > fresh.start  # a failure may still climb


def test_a_rung_is_never_skipped_before_it_has_enough_attempts():
    """Three failures are not evidence enough: the first rung is still where every plan starts."""
    history = attempts("single_pass", 0, MIN_ATTEMPTS - 1)
    assert starts(LADDER, history) == Counter({0: 400})
    assert "single_pass has too few attempts to judge" in plan(LADDER, history, rng=random.Random(1)).why


def test_a_rung_that_rarely_succeeds_is_mostly_skipped_but_still_tried(monkeypatch):
    """0/8 at single_pass against 6/8 at best_of_n at the same cost: plans start at best_of_n.
    The EXPLORE_SHARE of plans that read a random draw instead sometimes start at single_pass,
    so the prior cannot lock itself out."""
    history = attempts("single_pass", 0, 8) + attempts("best_of_n", 6, 2)
    assert starts(LADDER, history)[1] >= (1 - EXPLORE_SHARE) * 400 - 20
    monkeypatch.setattr("rmesh.router_svc.ladder.EXPLORE_SHARE", 1.0)
    counts = starts(LADDER, history)
    assert counts[1] > 0.75 * 400 and 0 < counts[0] < 0.25 * 400, counts
    chosen = plan(LADDER, history, rng=random.Random(3))
    assert "single_pass 0/8" in chosen.why and "best_of_n 6/8" in chosen.why


def test_a_cheap_rung_that_succeeds_often_enough_is_kept():
    history = attempts("single_pass", 3, 5, tokens=60) + attempts("best_of_n", 6, 2, tokens=600)
    assert starts(LADDER, history).most_common(1)[0][0] == 0


def test_cost_decides_between_rungs_of_equal_success():
    """Same success rates; the dearer first rung is skipped when the next one is cheaper per success."""
    cheap_first = attempts("single_pass", 4, 4, tokens=50) + attempts("best_of_n", 4, 4, tokens=800)
    dear_first = attempts("single_pass", 4, 4, tokens=800) + attempts("best_of_n", 6, 2, tokens=100)
    assert starts(LADDER, cheap_first).most_common(1)[0][0] == 0
    assert starts(LADDER, dear_first).most_common(1)[0][0] == 1


def test_a_rung_beyond_the_remaining_budget_does_not_count():
    stats = rung_stats(LADDER, attempts("single_pass", 1, 7) + attempts("best_of_n", 1, 7) + attempts("beam", 7, 1, tokens=900), 1000)
    rates = [s.mean_rate for s in stats]
    with_beam = climb_cost(stats, rates, 0, 10_000)
    without = climb_cost(stats, rates, 0, 300)
    # Beam's expected spend does not fit after the first two rungs: the climb stops before it.
    assert without == climb_cost(stats[:2], rates[:2], 0, 10_000) != with_beam


def test_best_of_n_width_follows_the_learned_rates():
    """The greedy answer's rate g and the samples' rate q apart; N the least with
    1 - (1 - g)(1 - q)^(N - 1) >= 0.9, within the route's width, never the greedy answer alone."""
    # Greedy failed each time, then the second of two samples passed: g = 1/10, q = 9/18.
    sampled_easy = attempts("best_of_n", 8, 0, samples=3)
    assert best_of_n_samples(sampled_easy, cap=8)[0] == 5  # 1 + ceil(log(0.1 / 0.9) / log(0.5))
    hard = attempts("best_of_n", 0, 8, samples=8)  # q = 1/58: the whole width
    assert best_of_n_samples(hard, cap=8)[0] == 8
    # Greedy always passed: a caller sending only easy requests cannot shrink N below 2.
    greedy_easy = attempts("best_of_n", 8, 0, samples=1)
    assert best_of_n_samples(greedy_easy, cap=8)[0] == 2
    assert best_of_n_samples(sampled_easy[:MIN_ATTEMPTS - 1], cap=8) == (0, "")
    # A plan reads q at the OPTIMISM quantile of its posterior, Beta(1 + 8, 1 + 8).
    steady = random.Random(1)
    assert not Reading(random.Random(1)).exploring
    chosen = plan(("best_of_n", "beam"), sampled_easy, max_samples=8, rng=steady)
    expected = samples_for(1 / 10, beta_quantile(OPTIMISM, 9, 9), cap=8)
    assert chosen.samples == expected and f"best_of_n N={expected}" in chosen.why


def test_beta_quantile_matches_closed_forms():
    """Beta(1, 1) is uniform; Beta(1, b) has the quantile 1 - (1 - p)^(1 / b)."""
    for p in (0.05, 0.5, 0.6, 0.95):
        assert beta_quantile(p, 1, 1) == pytest.approx(p, abs=1e-12)
        for b in (2, 7.5, 400):
            assert beta_quantile(p, 1, b) == pytest.approx(1 - (1 - p) ** (1 / b), abs=1e-12)
    assert beta_quantile(0.6, 30, 2) > beta_quantile(0.6, 2, 30)


# A kind nothing solves: six Best-of-16 requests without a pass (~70 tokens a candidate), four
# climbs to beam without one.
NOTHING_PASSES = attempts("best_of_n", 0, 6, tokens=1120, samples=16) + attempts("beam", 0, 4, tokens=400, samples=7)
LADDER2 = ("best_of_n", "beam")


def plans(history, draws=400, **kwargs):
    rng = random.Random(11)
    return [plan(LADDER2, history, rng=rng, max_samples=16, budget_tokens=2400, **kwargs) for _ in range(draws)]


def test_a_kind_nothing_solves_settles_on_its_greedy_answer_when_a_success_has_a_worth():
    """0 passes in 90 samples at ~70 tokens each: even a generous reading of q buys less than a
    sample costs at 2000 tokens a success, and beam's 0/4 at 400 tokens does not pay either.
    Most plans draw the greedy answer alone and do not climb; a few still explore."""
    given_up = [p for p in plans(NOTHING_PASSES, worth=2000) if p.samples == 1 and p.last == p.start]
    assert 0.85 * 400 < len(given_up) < 400
    why = given_up[0].why
    assert "best_of_n greedy only" in why and "no climb past best_of_n" in why and "2000 a success is worth" in why
    # Without a worth nothing is given up: the whole width, and the climb.
    assert all(p.samples == 16 and p.last == 1 for p in plans(NOTHING_PASSES, worth=0))


def test_a_kind_where_samples_pass_keeps_its_width():
    """3 passes in 90 samples (q ~ 0.04) at ~70 tokens: a sample is worth its tokens at 2000 a
    success, and the seed's N for q = 0.04 is over the route's 16."""
    some_pass = attempts("best_of_n", 3, 3, tokens=1120, samples=16)
    chosen = plans(some_pass, worth=2000)
    assert sum(p.samples == 16 for p in chosen) > 0.9 * 400
    # At 500 tokens a success the same record no longer pays for its samples.
    assert sum(p.samples == 1 for p in plans(some_pass, worth=500)) > 0.9 * 400


def test_nothing_is_given_up_before_the_evidence_minimum():
    """Three failed requests are not enough to stop sampling or climbing, however dear."""
    few = NOTHING_PASSES[: MIN_ATTEMPTS - 1]
    assert all(p.samples == 0 and p.last == 1 for p in plans(few, worth=10))


def test_other_kinds_of_the_route_lend_a_new_kind_their_record():
    """A kind never seen, on a route whose other kinds pass nothing: the lent record (at most
    POOL_WEIGHT requests) is evidence enough to draw the greedy answer alone and not climb."""
    chosen = plans([], worth=2000, pooled=NOTHING_PASSES * 5)
    assert sum(p.samples == 1 and p.last == p.start for p in chosen) > 0.85 * 400
    assert f"and the record of {POOL_WEIGHT} requests lent by the route's other kinds" in chosen[0].why
    # The kind's own record outweighs what is lent: its samples pass, so it keeps its width.
    own = attempts("best_of_n", 5, 3, tokens=600, samples=8)
    assert sum(p.samples > 1 for p in plans(own, worth=2000, pooled=NOTHING_PASSES * 5)) > 0.9 * 400


def test_rows_without_a_token_count_do_not_make_a_rung_look_free():
    old_rows = [Attempt("best_of_n", False, 0, 0)] * 6  # written before tokens were recorded
    (stats,) = rung_stats(("best_of_n",), old_rows, 1000)
    assert stats.mean_tokens == 1000 and stats.attempts == 6


async def test_failed_rung_escalates_and_progress_shows_it(mesh):
    """9 + 8 + 2 defeats best_of_n's greedy and samples: the router climbs to beam and says so."""
    request = router_pb2.SolveRequest(problem="What is 9 + 8 + 2?")
    request.task.kind = "arithmetic-escalation-test"
    request.task.checks.add(name="arithmetic").params.update({"expression": "9 + 8 + 2"})
    async with mesh.channel() as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        events = [e async for e in stub.Solve(request, metadata=[("authorization", "Bearer demo-key")], timeout=180)]
    config = events[1].config
    assert "ladder best_of_n > beam" in config.reason and "no history" in config.reason
    stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
    outcome = events[-1].outcome
    if not outcome.released or outcome.strategy == "beam":
        assert "escalate best_of_n -> beam" in stages, (stages, outcome)
        escalation = next(e.progress for e in events if e.WhichOneof("event") == "progress" and e.progress.stage.startswith("escalate"))
        later = [e.progress for e in events if e.WhichOneof("event") == "progress"][-1]
        assert later.usage.completion_tokens >= escalation.usage.completion_tokens > 0
    await mesh.services["router"].core.drain()
    history = mesh.services["router"].reviews.rung_history("demo", "arithmetic/arithmetic-escalation-test")
    assert history and history[-1][0] == "best_of_n"


def test_a_one_rung_ladder_with_history_says_so():
    assert plan(["best_of_n"], [Attempt("best_of_n", False)] * 6).why == "start at best_of_n, the only rung"
