"""KV capacity arithmetic: what a search's branches hold in the engine's KV cache.

KV bytes per token = 2 (K and V) x layers x KV heads x head dim x bytes per element. A branch of
C tokens holds C of them; N branches without sharing hold N x C (the worst case); N branches
that share a prefix of P tokens hold P + N x (C - P), which is what a radix or prefix cache
gives when the branches fork after the prompt.

The same arithmetic tells a tenant file's author whether a route's strategies fit an engine:
``route_warnings`` is what ``rmesh policy lint`` reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rmesh.domain import Budget, SearchParams

# What a request's prompt takes before the answer: instructions, worked examples and the
# request itself. The shipped prompts run 230-330 tokens on Gemma 3 270M with a short problem.
PROMPT_TOKENS_ESTIMATE = 350
TREE_STRATEGIES = frozenset({"single_path", "beam", "mcts"})
SAMPLING_STRATEGIES = frozenset({"best_of_n", "self_consistency"})


@dataclass(frozen=True)
class CapacityRow:
    branches: int
    context: int  # tokens per branch, the prefix included
    per_branch: int  # bytes
    worst_case: int  # bytes, no sharing
    shared_prefix: int  # bytes, the prefix held once


def capacity_rows(bytes_per_token: int, branch_counts: Sequence[int], context: int, prefix: int) -> list[CapacityRow]:
    prefix = max(0, min(prefix, context))
    return [
        CapacityRow(
            branches=n,
            context=context,
            per_branch=context * bytes_per_token,
            worst_case=n * context * bytes_per_token,
            shared_prefix=(prefix + n * (context - prefix)) * bytes_per_token,
        )
        for n in branch_counts
    ]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def branches_to_full_depth(strategy: str, budget: Budget, search: SearchParams) -> int:
    """Branches a search needs to reach its last step (or draw all its samples)."""
    if strategy == "beam":
        factor, width = max(1, search.branching_factor), max(1, search.beam_width)
        return factor + (budget.max_depth - 1) * width * factor
    if strategy in SAMPLING_STRATEGIES:
        return search.samples or budget.max_branches
    if strategy == "single_path":
        return budget.max_depth
    return 1


def path_tokens(strategy: str, budget: Budget) -> int:
    """The most tokens one branch generates: every step of a tree search, or one whole answer."""
    steps = budget.max_depth if strategy in TREE_STRATEGIES else 1
    return min(budget.max_tokens, budget.max_tokens_per_branch * steps)


def route_warnings(
    strategies: Sequence[str],
    budget: Budget,
    search: SearchParams,
    *,
    engine_tokens: int,
    bytes_per_token: int,
    prompt_tokens: int = PROMPT_TOKENS_ESTIMATE,
) -> list[str]:
    """Why a route's ladder cannot run as written on an engine of ``engine_tokens`` KV tokens."""
    out = []
    for strategy in strategies:
        one = prompt_tokens + path_tokens(strategy, budget)
        if one > engine_tokens:
            out.append(
                f"{strategy}: one branch needs about {one} tokens of KV (a {prompt_tokens}-token prompt and "
                f"{path_tokens(strategy, budget)} generated), more than the engine's {engine_tokens}"
            )
        needed = branches_to_full_depth(strategy, budget, search)
        if strategy in ("beam", "single_path") and needed > budget.max_branches:
            out.append(
                f"{strategy}: reaching max_depth {budget.max_depth} takes {needed} branches; "
                f"max_branches {budget.max_branches} stops it earlier"
            )
        if budget.max_kv_bytes and budget.max_kv_bytes < one * bytes_per_token:
            out.append(
                f"{strategy}: max_kv_bytes {budget.max_kv_bytes} is less than one branch "
                f"({one} tokens x {bytes_per_token} bytes = {one * bytes_per_token})"
            )
    return out
