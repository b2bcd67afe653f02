"""Quality benchmark: accuracy of each strategy on reasoning-gym tasks, graded by
reasoning-gym's own scorers, beside the oracle pass@k of the same sampler. Writes
bench/out/quality.json.

Tasks are generated offline: ``basic_arithmetic`` (1-digit operands, 2-3 terms, checked by the
``arithmetic`` checker) and ``countdown`` (3-4 numbers up to 10, checked by
``expression_target``). The graders see only what the mesh released; they never reach the
verifier. Every strategy gets the same generated-token budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import reasoning_gym

from bench.common import OUT, local_verifier, machine, no_progress, write
from rmesh.domain import Budget, CheckSpec, SearchParams, TaskSpec
from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.engine.llama import LlamaEngine
from rmesh.solver_svc.core import SolverCore
from rmesh.solving import SolveRequest
from rmesh.solver_svc.prompt import build_grammar, build_prompt, parse_response

K = 8
TOKEN_BUDGET = 960
OUT_FILE = OUT / "quality.json"
STRATEGIES = {
    "single_pass": SearchParams(),
    "single_path": SearchParams(),
    "best_of_n": SearchParams(samples=K),
    "self_consistency": SearchParams(samples=K),
    "beam": SearchParams(beam_width=2, branching_factor=3, no_improvement_rounds=0),
    "mcts": SearchParams(branching_factor=3, no_improvement_rounds=3),
}


def datasets(size_arith: int, size_countdown: int):
    arithmetic = reasoning_gym.create_dataset(
        "basic_arithmetic", min_terms=2, max_terms=3, min_digits=1, max_digits=1, size=size_arith, seed=42
    )
    countdown = reasoning_gym.create_dataset(
        "countdown", min_numbers=3, max_numbers=4, min_value=1, max_value=10, min_target=5, max_target=30,
        size=size_countdown, seed=42,
    )
    return {"basic_arithmetic": arithmetic, "countdown": countdown}


def task_for(name: str, entry: dict) -> tuple[str, TaskSpec]:
    meta = entry["metadata"]
    if name == "basic_arithmetic":
        return f"What is {meta['expression']}?", TaskSpec(name, (CheckSpec("arithmetic", {"expression": meta["expression"]}),))
    numbers = ", ".join(str(n) for n in meta["numbers"])
    return (
        f"Make {meta['target']} using each of the numbers {numbers} exactly once.",
        TaskSpec(
            name,
            (CheckSpec("expression_target", {"numbers": meta["numbers"], "target": meta["target"], "use_all": True}),),
        ),
    )


async def oracle(engine, problem: str, numeric: bool, seed: int) -> list[str]:
    """K whole answers from the same prompt and grammar best_of_n uses: one greedy, K-1 sampled."""
    prompt = build_prompt(problem, {}, numeric, True, not numeric)
    grammar = build_grammar({}, numeric_answer=numeric, expression_answer=not numeric, max_checkpoints=3)
    greedy = await engine.generate(GenerationRequest(prompt, 1, SamplingParams(max_new_tokens=120, temperature=0), grammar))
    sampled = await engine.generate(
        GenerationRequest(prompt, K - 1, SamplingParams(max_new_tokens=120, temperature=0.9, seed=seed), grammar)
    )
    return [parse_response("o", r.text).final_answer for r in greedy + sampled]


async def main(size_arith: int, size_countdown: int, only: str = "") -> None:
    engine = LlamaEngine.load(n_ctx=8192, max_branches=8)
    core = SolverCore(engine, local_verifier())
    report: dict = {"machine": machine(), "engine": engine.model_name, "k": K, "token_budget": TOKEN_BUDGET, "datasets": {}}
    previous = json.loads(OUT_FILE.read_text()) if only and OUT_FILE.exists() else None
    if previous:
        report["datasets"] = previous["datasets"]
    for name, dataset in datasets(size_arith, size_countdown).items():
        if only and name != only:
            continue
        entries = list(dataset)
        rows: dict = {}
        pass1 = passk = 0
        for index, entry in enumerate(entries):
            problem, _ = task_for(name, entry)
            answers = await oracle(engine, problem, name == "basic_arithmetic", seed=1000 + index)
            scores = [dataset.score_answer(a, entry) == 1.0 for a in answers]
            pass1 += scores[0]
            passk += any(scores)
        for strategy, search in STRATEGIES.items():
            correct = released = 0
            tokens, cached, walls = [], [], []
            for index, entry in enumerate(entries):
                problem, task = task_for(name, entry)
                request = SolveRequest(
                    problem=problem, task=task, strategy=strategy,
                    budget=Budget(TOKEN_BUDGET, 24, 4, 300, 120), search=search, seed=1000 + index,
                )
                started = time.monotonic()
                result = await core.solve(request, no_progress)
                walls.append(time.monotonic() - started)
                tokens.append(result.usage.completion_tokens)
                cached.append(result.usage.cached_tokens)
                if result.eligible:
                    released += 1
                    correct += dataset.score_answer(result.best.final_answer, entry) == 1.0
                print(f"{name} {strategy} {index + 1}/{len(entries)}", file=sys.stderr, end="\r")
            rows[strategy] = {
                "accuracy": round(correct / len(entries), 4),
                "released": round(released / len(entries), 4),
                "generated_tokens_mean": round(statistics.mean(tokens), 1),
                "cached_tokens_mean": round(statistics.mean(cached), 1),
                "wall_seconds_p50": round(statistics.median(walls), 3),
            }
        best_of_n = rows["best_of_n"]["accuracy"]
        oracle_k = passk / len(entries)
        report["datasets"][name] = {
            "size": len(entries),
            "oracle_pass_at_1": round(pass1 / len(entries), 4),
            f"oracle_pass_at_{K}": round(oracle_k, 4),
            "strategies": rows,
            "best_of_n_vs_pass_at_k": {
                "best_of_n_accuracy": best_of_n,
                "goal": f">= 0.95 x pass@{K} = {round(0.95 * oracle_k, 4)}",
                "met": best_of_n >= 0.95 * oracle_k,
            },
        }
        print(f"{name}: pass@1={pass1 / len(entries):.3f} pass@{K}={oracle_k:.3f} " + ", ".join(
            f"{s}={r['accuracy']:.3f}/{r['generated_tokens_mean']:.0f}tok" for s, r in rows.items()), file=sys.stderr)
    await engine.aclose()
    write("quality.json", report)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arithmetic", type=int, default=24, help="basic_arithmetic tasks")
    parser.add_argument("--countdown", type=int, default=16, help="countdown tasks")
    parser.add_argument("--only", choices=["basic_arithmetic", "countdown"], help="rerun one data set, keep the other's figures")
    args = parser.parse_args()
    asyncio.run(main(args.arithmetic, args.countdown, args.only or ""))
