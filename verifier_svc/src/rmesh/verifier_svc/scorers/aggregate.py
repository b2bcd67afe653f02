"""How per-step (process) scores combine into one candidate score."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rmesh.errors import InvalidRequest

# With no step to judge there is no evidence either way.
NO_STEPS = 0.5

AGGREGATIONS = {
    "min": min,  # a chain is as strong as its weakest step
    "last": lambda scores: scores[-1],  # the judge's view of the whole prefix
    "prod": math.prod,  # every step must hold
}


def aggregate(scores: Sequence[float], how: str) -> float:
    if how not in AGGREGATIONS:
        raise InvalidRequest("aggregation", f"unknown aggregation {how!r}; known: {', '.join(sorted(AGGREGATIONS))}")
    return float(AGGREGATIONS[how](list(scores))) if scores else NO_STEPS
