"""``self_consistency``: sample N answers, normalise them, take the majority.

Votes are counted over finished answers. An answer group that passes the exact checks beats
any larger group that fails them; within the chosen group the best-verified candidate speaks.
The result reports the winning group's vote share.
"""

from __future__ import annotations

import re
from collections import defaultdict

from rmesh.solving import STOP_COMPLETED, SolveResult
from rmesh.solver_svc.search import Node, SearchState
from rmesh.numbers import format_number, parse_number

NAME = "self_consistency"
TEMPERATURE = 0.9


def normalise_answer(answer: str) -> str:
    number = parse_number(answer)
    if number is not None:
        return format_number(number)
    return re.sub(r"[\s.!]+$", "", re.sub(r"\s+", " ", answer.strip().lower()))


def vote(nodes: list[Node]) -> tuple[Node | None, float]:
    groups: dict[str, list[Node]] = defaultdict(list)
    for node in nodes:
        if node.finished and node.candidate.final_answer:
            groups[normalise_answer(node.candidate.final_answer)].append(node)
    if not groups:
        return None, 0.0
    members = max(
        groups.values(), key=lambda g: (any(n.verdict.release for n in g), len(g), max(n.score for n in g))
    )
    return max(members, key=lambda n: n.rank), len(members) / sum(len(g) for g in groups.values())


async def run(*, state: SearchState) -> SolveResult:
    n = state.samples()
    stop = STOP_COMPLETED
    remaining = n
    while remaining > 0:
        batch = min(remaining, state.live_cap)
        if reason := state.stop_before_round(batch):
            stop = reason
            break
        await state.expand([None], n=batch, temperature=state.temperature(TEMPERATURE), stage="sampled", step=False)
        remaining -= batch
    chosen, share = vote(state.nodes)
    return state.result(NAME, stop, chosen=chosen, vote_share=share)
