"""Compute-optimal escalation: where on a route's strategy ladder to start, how wide to sample and
how far to climb.

The learned prior is the recent history of rung attempts for one tenant and task kind: whether
each succeeded, the tokens it spent and the samples it drew. Each rung keeps a Beta posterior
of its success rate and a shrunken mean of its token cost; the route's other kinds lend the
prior their record, weighted as POOL_WEIGHT attempts at most, so a new kind starts from what
its route has seen and its own attempts soon outweigh it. A plan reads each posterior at the
OPTIMISM quantile: a choice is given up only when a generous reading of its record says it does
not pay. EXPLORE_SHARE of plans read one random draw instead (Thompson sampling), so a choice
the data argues against is still made now and then and the prior never locks itself out. No
rung is skipped, and no Best-of-N width learned, before MIN_ATTEMPTS attempts' evidence (the
kind's own and what is lent).

- Start: the rung whose climb (start there, go up on failure) has the lowest expected tokens
  per success within the route's budget.
- Width: Best-of-N's N from its per-sample pass rate q (it samples until the first exact pass,
  so successes over samples drawn estimate q): the seed's N = ceil(log(1 - target) / log(1 -
  q)), within the route's samples.
- Worth: a route may say what a success is worth, ``max_tokens_per_success``. Spending past
  that is not compute that pays: a sample is drawn only while q times the worth covers a
  sample's tokens, and a rung is climbed to only while its success rate times the worth covers
  its mean cost. A kind nothing solves thus settles on its greedy answer, at about the worth's
  tokens of exploration in all, while a kind where samples pass keeps its full width.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

# A rung can be skipped, or Best-of-N narrowed, only once it has this many attempts in the window.
MIN_ATTEMPTS = 4
WINDOW = 60
# Best-of-N draws enough samples to pass with this probability, at its learned per-sample rate.
TARGET_PASS = 0.9
# Weight, in attempts, of a rung's assumed token cost before it has data.
COST_PRIOR_WEIGHT = 1.0
# The route's other task kinds lend a kind's prior at most this many attempts of their record.
POOL_WEIGHT = 4
POOL_WINDOW = 200
BEST_OF_N = "best_of_n"
# A plan reads each posterior at this quantile: optimistic, so a choice is given up on only when
# even a generous reading of its record says it does not pay...
OPTIMISM = 0.6
# ... except this share of plans, which act on one random draw from the posteriors instead
# (Thompson sampling), so a choice given up on is still made now and then.
EXPLORE_SHARE = 0.05


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
    lent_successes: float = 0.0  # what the route's other kinds lend the prior, in attempts
    lent_failures: float = 0.0

    @property
    def evidence(self) -> float:
        return self.attempts + self.lent_successes + self.lent_failures

    @property
    def alpha(self) -> float:
        return 1.0 + self.successes + self.lent_successes

    @property
    def beta(self) -> float:
        return 1.0 + self.attempts - self.successes + self.lent_failures

    @property
    def mean_rate(self) -> float:
        return self.alpha / (self.alpha + self.beta)


@dataclass(frozen=True)
class Plan:
    start: int
    last: int  # the highest rung a failure may climb to
    why: str
    samples: int = 0  # best_of_n's N from the learned per-sample rate; 0: the route's own


@dataclass(frozen=True)
class SampleEvidence:
    """What Best-of-N's attempts say: greedy passes in ``requests``, and ``passed`` successes in
    ``drawn`` samples beyond the greedy answer, at ``tokens_each`` tokens a candidate. The
    route's other kinds lend at most POOL_WEIGHT requests' worth (``lent_*``)."""

    requests: int
    greedy_passes: int
    drawn: int
    passed: int
    tokens_each: float
    lent_requests: float = 0.0
    lent_greedy_passes: float = 0.0
    lent_drawn: float = 0.0
    lent_passed: float = 0.0

    @classmethod
    def of(cls, history: Sequence[Attempt], pooled: Sequence[Attempt] = ()) -> SampleEvidence:
        own, lent = _sample_counts(history), _sample_counts(pooled)
        costed = [a for a in history if a.rung == BEST_OF_N and a.samples > 0 and a.tokens > 0]
        if not costed:
            costed = [a for a in pooled if a.rung == BEST_OF_N and a.samples > 0 and a.tokens > 0]
        candidates = sum(a.samples for a in costed)
        share = min(POOL_WEIGHT, lent[0]) / lent[0] if lent[0] else 0.0
        return cls(
            *own,
            tokens_each=sum(a.tokens for a in costed) / candidates if candidates else 0.0,
            lent_requests=lent[0] * share,
            lent_greedy_passes=lent[1] * share,
            lent_drawn=lent[2] * share,
            lent_passed=lent[3] * share,
        )

    @property
    def evidence(self) -> float:
        return self.requests + self.lent_requests

    @property
    def greedy_rate(self) -> float:
        return (1.0 + self.greedy_passes + self.lent_greedy_passes) / (2.0 + self.evidence)

    @property
    def sample_alpha(self) -> float:
        return 1.0 + self.passed + self.lent_passed

    @property
    def sample_beta(self) -> float:
        return 1.0 + self.drawn - self.passed + self.lent_drawn - self.lent_passed

    @property
    def sample_rate(self) -> float:
        return self.sample_alpha / (self.sample_alpha + self.sample_beta)


class Reading:
    """How one plan reads the Beta posteriors: at the OPTIMISM quantile, or, for EXPLORE_SHARE
    of plans, as one random draw."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.exploring = rng.random() < EXPLORE_SHARE

    def rate(self, alpha: float, beta: float) -> float:
        if self.exploring:
            return self.rng.betavariate(alpha, beta)
        return beta_quantile(OPTIMISM, alpha, beta)


@functools.lru_cache(maxsize=4096)
def beta_quantile(p: float, alpha: float, beta: float) -> float:
    """The x with P(X <= x) = p for X ~ Beta(alpha, beta), by bisection on the CDF. Cached:
    the parameters are counts, so plans read the same few posteriors again and again."""
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if _beta_cdf(mid, alpha, beta) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), from its continued fraction."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny = 1e-300

    def guard(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, 300):
        even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 / guard(1.0 + even * d)
        c = guard(1.0 + even / c)
        result *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 / guard(1.0 + odd * d)
        c = guard(1.0 + odd / c)
        step = d * c
        result *= step
        if abs(step - 1.0) < 1e-12:
            break
    return result


def _sample_counts(history: Sequence[Attempt]) -> tuple[int, int, int, int]:
    """Best-of-N requests, greedy passes, samples drawn beyond the greedy answer, sampled passes."""
    rows = [a for a in history if a.rung == BEST_OF_N and a.samples > 0]
    sampled = [a for a in rows if a.samples > 1]
    return (
        len(rows),
        sum(1 for a in rows if a.success and a.samples == 1),
        sum(a.samples - 1 for a in sampled),
        sum(1 for a in sampled if a.success),
    )


def rung_stats(
    ladder: Sequence[str], history: Sequence[Attempt], budget_tokens: int, pooled: Sequence[Attempt] = ()
) -> list[RungStats]:
    """Each rung's posterior summary. The route's other kinds (``pooled``) lend the prior at
    most POOL_WEIGHT attempts at their success rate and their mean cost; without them, a rung is
    assumed to cost its share of the budget, growing up the ladder (rung i of k: budget · (i +
    1) / k). Attempts recorded without a token count (rows older than the count) say nothing
    about cost."""
    out = []
    for index, name in enumerate(ladder):
        rows = [a for a in history if a.rung == name]
        costed = [a.tokens for a in rows if a.tokens > 0]
        lent = [a for a in pooled if a.rung == name]
        lent_costed = [a.tokens for a in lent if a.tokens > 0]
        if lent_costed:
            assumed = sum(lent_costed) / len(lent_costed)
        else:
            assumed = budget_tokens * (index + 1) / len(ladder)
        mean = (sum(costed) + COST_PRIOR_WEIGHT * assumed) / (len(costed) + COST_PRIOR_WEIGHT)
        weight = min(POOL_WEIGHT, len(lent))
        lent_rate = sum(1 for a in lent if a.success) / len(lent) if lent else 0.0
        out.append(RungStats(
            name, len(rows), sum(1 for a in rows if a.success), max(1.0, mean),
            weight * lent_rate, weight * (1.0 - lent_rate),
        ))
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


def samples_for(g: float, q: float, cap: int, target: float = TARGET_PASS) -> int:
    """The least N with 1 - (1 - g)(1 - q)^(N - 1) >= target, within ``cap``, never below 2:
    the seed's N = ceil(log(1 - target) / log(1 - q)) after the greedy draw."""
    left = (1.0 - target) / (1.0 - g)
    more = math.ceil(math.log(left) / math.log(1.0 - q)) if left < 1 and q < 1 else 0
    return max(min(2, cap), min(cap, 1 + more))


def best_of_n_samples(
    history: Sequence[Attempt],
    cap: int,
    target: float = TARGET_PASS,
    *,
    worth: int = 0,
    reading: Reading | None = None,
    pooled: Sequence[Attempt] = (),
) -> tuple[int, str]:
    """N for Best-of-N from what its attempts show, within ``cap``; 0 without enough data.

    The greedy answer's pass rate g and the samples' per-draw rate q are estimated apart (an
    attempt that passed with one candidate passed on its greedy answer; one with more drew
    ``samples - 1`` samples, and passed on one of them if it passed at all). With a ``reading``, q
    is its posterior read that way rather than its mean. With a ``worth`` (tokens a success is
    worth), N is 1, the greedy answer alone, when q times the worth does not cover a sample's
    tokens; otherwise N follows ``samples_for``."""
    seen = SampleEvidence.of(history, pooled)
    if seen.evidence < MIN_ATTEMPTS or cap < 1:
        return 0, ""
    q = reading.rate(seen.sample_alpha, seen.sample_beta) if reading is not None else seen.sample_rate
    g = seen.greedy_rate
    record = f"greedy passed {seen.greedy_passes}/{seen.requests}, samples {seen.passed} in {seen.drawn}"
    if seen.lent_requests:
        record += f" (and the record of {seen.lent_requests:.0f} requests lent by the route's other kinds)"
    if worth > 0 and seen.tokens_each > 0 and q * worth < seen.tokens_each:
        return 1, (
            f"{BEST_OF_N} greedy only: {record}; a sample's ~{seen.tokens_each:.0f} tokens buy "
            f"{q * worth:.0f} of the {worth} a success is worth"
        )
    n = samples_for(g, q, cap, target)
    return n, f"{BEST_OF_N} N={n}: {record} (q={q:.2f}), target {target:.0%}"


def plan(
    ladder: Sequence[str],
    history: Sequence[Attempt | tuple],
    *,
    budget_tokens: int = 1000,
    max_samples: int = 0,
    worth: int = 0,
    rng: random.Random | None = None,
    pooled: Sequence[Attempt | tuple] = (),
) -> Plan:
    """Where to start on ``ladder`` and how far to climb, given recent attempts, newest first.
    ``max_samples`` is the route's Best-of-N width (the cap on a learned N); ``worth`` the
    tokens a success is worth (0: no limit)."""
    recent = [Attempt(*row) for row in history[:WINDOW]]
    lent = [Attempt(*row) for row in pooled[:POOL_WINDOW]]
    reading = Reading(rng or random.Random())
    samples, sampled_why = (
        best_of_n_samples(recent, max_samples, worth=worth, reading=reading, pooled=lent) if BEST_OF_N in ladder else (0, "")
    )
    last = len(ladder) - 1
    if len(ladder) == 1:
        return Plan(0, 0, _join(f"start at {ladder[0]}, the only rung", sampled_why), samples)
    if not recent and not lent:
        return Plan(0, last, f"no history for this task kind: start at {ladder[0]}")
    stats = rung_stats(ladder, recent, budget_tokens, lent)
    # No rung is skipped before it has been judged: the latest start is the first unjudged rung.
    latest = next((i for i, s in enumerate(stats) if s.evidence < MIN_ATTEMPTS), last)
    drawn = [reading.rate(s.alpha, s.beta) for s in stats]
    costs = [climb_cost(stats, drawn, start, budget_tokens) for start in range(latest + 1)]
    start = min(range(latest + 1), key=lambda i: (costs[i], i))
    if worth > 0 and costs[start] > worth:
        start = 0  # no start is worth its cost: the cheapest attempt, and climbs only where they pay
    summary = ", ".join(f"{s.name} {s.successes}/{s.attempts} ~{s.mean_tokens:.0f} tok" for s in stats)
    why = f"start at {ladder[start]}"
    if start > 0:
        why += " (skip " + ", ".join(ladder[:start]) + ")"
    if reading.exploring:
        why += " (exploring: this plan reads a random draw from the posteriors)"
    if latest < last and start == latest and stats[latest].evidence < MIN_ATTEMPTS:
        why += f"; {ladder[latest]} has too few attempts to judge"
    top = start
    while top < last and _worth_climbing(stats[top + 1], drawn[top + 1], worth):
        top += 1
    if top < last:
        above, rate = stats[top + 1], drawn[top + 1]
        per_success = f"~{above.mean_tokens / rate:.0f}" if rate > 0 else "unbounded"
        why += (
            f"; no climb past {ladder[top]}: {above.name} succeeds {above.successes}/{above.attempts} "
            f"at ~{above.mean_tokens:.0f} tokens, {per_success} tokens per success, over the {worth} a success is worth"
        )
    return Plan(start, top, _join(f"{why}; {summary}", sampled_why), samples)


def _worth_climbing(rung: RungStats, rate: float, worth: int) -> bool:
    """A rung is climbed to until it has been judged, and then while its drawn success rate
    times what a success is worth covers its mean cost."""
    return worth <= 0 or rung.evidence < MIN_ATTEMPTS or rate * worth >= rung.mean_tokens


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
