"""Compute-optimal escalation: where on a route's strategy ladder to start, and when to stop.

The learned prior is the recent history of rung attempts for one tenant and task kind: a rung
that has been tried enough and almost never succeeds is skipped; a kind whose top rung has
failed several requests in a row, with no success anywhere in the window, gets one cheap
attempt and no escalation (knowing when to give up is part of spending compute only where it
pays). Counting top-rung failures counts whole requests that climbed the ladder and still
failed, not the individual rungs they tried on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A rung is judged once it has this many attempts in the window.
MIN_ATTEMPTS = 4
# Below this success rate a judged rung is skipped.
SKIP_BELOW = 0.15
# With this many failed top-rung attempts and no success anywhere, stop after the first rung.
HOPELESS_AFTER = 4
WINDOW = 60


@dataclass(frozen=True)
class Plan:
    start: int
    escalate: bool
    why: str


def plan(ladder: Sequence[str], history: Sequence[tuple[str, bool]]) -> Plan:
    """Where to start on ``ladder`` given recent ``(rung, success)`` attempts, newest first."""
    recent = list(history[:WINDOW])
    if not recent:
        return Plan(0, True, f"no history for this task kind: start at {ladder[0]}")
    top_failures = sum(1 for name, ok in recent if name == ladder[-1] and not ok)
    if len(ladder) > 1 and top_failures >= HOPELESS_AFTER and not any(ok for _, ok in recent):
        return Plan(
            0, False, f"{ladder[-1]} failed the last {top_failures} requests and nothing succeeded: one {ladder[0]} attempt, no escalation"
        )
    notes = []
    for index, rung in enumerate(ladder[:-1]):
        attempts = [ok for name, ok in recent if name == rung]
        if len(attempts) < MIN_ATTEMPTS:
            return Plan(index, True, f"start at {rung}" + (f" ({'; '.join(notes)})" if notes else ""))
        rate = sum(attempts) / len(attempts)
        if rate >= SKIP_BELOW:
            return Plan(index, True, f"start at {rung}: it succeeded in {sum(attempts)}/{len(attempts)} recent attempts"
                        + (f" ({'; '.join(notes)})" if notes else ""))
        notes.append(f"skip {rung}: {sum(attempts)}/{len(attempts)}")
    if not notes:
        return Plan(0, True, f"start at {ladder[0]}, the only rung")
    return Plan(len(ladder) - 1, True, f"start at {ladder[-1]} ({'; '.join(notes)})")
