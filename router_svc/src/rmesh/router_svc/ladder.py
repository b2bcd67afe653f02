"""Compute-optimal escalation: where on a route's strategy ladder to start, and how wide to sample.

The learned prior is the recent history of rung attempts for one tenant and task kind: whether
each succeeded, the tokens it spent and the samples it drew. Each rung keeps a Beta posterior
of its success rate and a shrunken mean of its token cost. A plan starts at the rung whose
climb (start there, go up on failure) has the lowest expected tokens per success within the
route's budget, judged on a draw from the posteriors (Thompson sampling): a rung the data
argues against is skipped most of the time but still tried now and then, so the prior never
locks itself out. No rung is skipped before it has MIN_ATTEMPTS attempts in the window.

Best-of-N's N comes from its learned per-sample pass rate q (it samples until the first exact
pass, so successes over samples drawn estimate q): the seed's N = ceil(log(1 - target) /
log(1 - q)), within the route's samples.

A kind whose top rung has failed several requests in a row, with no success anywhere in the
window, gets one cheap attempt and no escalation (knowing when to give up is part of spending
compute only where it pays); one request in ten still climbs, so that state cannot last.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

# A rung can be skipped only once it has this many attempts in the window.
MIN_ATTEMPTS = 4
# With this many failed top-rung attempts and no success anywhere, stop after the first rung...
HOPELESS_AFTER = 4
# ... except for this share of requests, which still climb, so a kind that became solvable (or
# whose window a run of unsolvable requests filled) is noticed.
HOPELESS_RETRY = 0.1
WINDOW = 60
# Best-of-N draws enough samples to pass with this probability, at its learned per-sample rate.
TARGET_PASS = 0.9
# Weight, in attempts, of a rung's assumed token cost before it has data.
COST_PRIOR_WEIGHT = 1.0
BEST_OF_N = "best_of_n"


class Attempt(NamedTuple):
    rung: str
    success: bool
    tokens: int = 0  # completion tokens the rung spent
    samples: int = 0  # candidates it evaluated


@dataclass(frozen=True)
class RungStats:
    name: str
    attempts: int
    successes: int
    mean_tokens: float

    @property
    def alpha(self) -> float:
        return 1.0 + self.successes

    @property
    def beta(self) -> float:
        return 1.0 + self.attempts - self.successes

    @property
    def mean_rate(self) -> float:
        return self.alpha / (self.alpha + self.beta)


@dataclass(frozen=True)
class Plan:
    start: int
    escalate: bool
    why: str
    samples: int = 0  # best_of_n's N from the learned per-sample rate; 0: the route's own


def rung_stats(ladder: Sequence[str], history: Sequence[Attempt], budget_tokens: int) -> list[RungStats]:
    """Each rung's posterior summary. Before data, a rung is assumed to cost its share of the
    budget, growing up the ladder (rung i of k: budget · (i + 1) / k); attempts recorded
    without a token count (rows older than the count) say nothing about cost."""
    out = []
    for index, name in enumerate(ladder):
        rows = [a for a in history if a.rung == name]
        costed = [a.tokens for a in rows if a.tokens > 0]
        assumed = budget_tokens * (index + 1) / len(ladder)
        mean = (sum(costed) + COST_PRIOR_WEIGHT * assumed) / (len(costed) + COST_PRIOR_WEIGHT)
        out.append(RungStats(name, len(rows), sum(1 for a in rows if a.success), max(1.0, mean)))
    return out


def climb_cost(stats: Sequence[RungStats], rates: Sequence[float], start: int, budget_tokens: int) -> float:
    """Expected tokens per success of starting at ``start`` and climbing on failure, over the
    rungs whose expected spend fits ``budget_tokens``; inf when none can succeed."""
    cost, reach, failing = 0.0, 1.0, 1.0
    spent = 0.0
    for rung in range(start, len(stats)):
        if rung > start and spent + stats[rung].mean_tokens > budget_tokens:
            break
        cost += reach * stats[rung].mean_tokens
        spent += stats[rung].mean_tokens
        failing *= 1.0 - rates[rung]
        reach = failing
    success = 1.0 - failing
    return cost / success if success > 0 else math.inf


def best_of_n_samples(history: Sequence[Attempt], cap: int, target: float = TARGET_PASS) -> tuple[int, str]:
    """N for Best-of-N from what its attempts show, within ``cap``; 0 without enough data.

    Best-of-N draws its greedy answer first, then samples until a batch passes. The greedy
    answer's pass rate g and the samples' per-draw rate q are estimated apart (an attempt that
    passed with one candidate passed on its greedy answer; one with more drew ``samples - 1``
    samples, and passed on one of them if it passed at all), and N is the least with
    1 - (1 - g)(1 - q)^(N - 1) >= target: the seed's N = ceil(log(1 - target) / log(1 - q)),
    after the greedy draw. A learned N keeps at least one sample beyond the greedy answer."""
    rows = [a for a in history if a.rung == BEST_OF_N and a.samples > 0]
    if len(rows) < MIN_ATTEMPTS or cap < 1:
        return 0, ""
    greedy_passes = sum(1 for a in rows if a.success and a.samples == 1)
    g = (1.0 + greedy_passes) / (2.0 + len(rows))
    sampled = [a for a in rows if a.samples > 1]
    drawn = sum(a.samples - 1 for a in sampled)
    passed = sum(1 for a in sampled if a.success)
    q = (1.0 + passed) / (2.0 + drawn)
    left = (1.0 - target) / (1.0 - g)
    more = math.ceil(math.log(left) / math.log(1.0 - q)) if left < 1 else 0
    n = max(min(2, cap), min(cap, 1 + more))
    return n, (
        f"{BEST_OF_N} N={n}: greedy passed {greedy_passes}/{len(rows)}, samples {passed} in {drawn} "
        f"(q={q:.2f}), target {target:.0%}"
    )


def plan(
    ladder: Sequence[str],
    history: Sequence[Attempt | tuple],
    *,
    budget_tokens: int = 1000,
    max_samples: int = 0,
    rng: random.Random | None = None,
) -> Plan:
    """Where to start on ``ladder`` given recent attempts, newest first; ``max_samples`` is the
    route's Best-of-N width (the cap on a learned N)."""
    recent = [Attempt(*row) for row in history[:WINDOW]]
    if len(ladder) == 1:
        samples, sampled_why = best_of_n_samples(recent, max_samples) if BEST_OF_N in ladder else (0, "")
        return Plan(0, True, _join(f"start at {ladder[0]}, the only rung", sampled_why), samples)
    if not recent:
        return Plan(0, True, f"no history for this task kind: start at {ladder[0]}")
    samples, sampled_why = best_of_n_samples(recent, max_samples) if BEST_OF_N in ladder else (0, "")
    draw = rng or random
    top_failures = sum(1 for a in recent if a.rung == ladder[-1] and not a.success)
    hopeless = len(ladder) > 1 and top_failures >= HOPELESS_AFTER and not any(a.success for a in recent)
    if hopeless and draw.random() < HOPELESS_RETRY:
        return Plan(0, True, f"{ladder[-1]} failed the last {top_failures} requests: climbing once more in case that changed", samples)
    if hopeless:
        # One cheap attempt: a Best-of-N first rung draws its greedy answer only.
        return Plan(
            0, False,
            f"{ladder[-1]} failed the last {top_failures} requests and nothing succeeded: one {ladder[0]} attempt"
            + (" (greedy only)" if ladder[0] == BEST_OF_N else "") + ", no escalation",
            1 if ladder[0] == BEST_OF_N else samples,
        )
    stats = rung_stats(ladder, recent, budget_tokens)
    # No rung is skipped before it has been judged: the latest start is the first unjudged rung.
    latest = next((i for i, s in enumerate(stats) if s.attempts < MIN_ATTEMPTS), len(ladder) - 1)
    drawn = [draw.betavariate(s.alpha, s.beta) for s in stats]
    costs = [climb_cost(stats, drawn, start, budget_tokens) for start in range(latest + 1)]
    start = min(range(latest + 1), key=lambda i: (costs[i], i))
    expected = [climb_cost(stats, [s.mean_rate for s in stats], i, budget_tokens) for i in range(latest + 1)]
    favoured = min(range(latest + 1), key=lambda i: (expected[i], i))
    summary = ", ".join(f"{s.name} {s.successes}/{s.attempts} ~{s.mean_tokens:.0f} tok" for s in stats)
    why = f"start at {ladder[start]}"
    if start != favoured:
        why += f" (exploring: the posterior means favour {ladder[favoured]})"
    elif start > 0:
        why += " (skip " + ", ".join(ladder[:start]) + ")"
    if latest < len(ladder) - 1 and start == latest and stats[latest].attempts < MIN_ATTEMPTS:
        why += f"; {ladder[latest]} has too few attempts to judge"
    return Plan(start, True, _join(f"{why}; {summary}", sampled_why), samples)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
