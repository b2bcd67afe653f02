"""``rmesh verifier calibrate``: fit the learned scorer's release threshold on labelled candidates.

Candidates come from the solver's own prompt and grammar on reasoning-gym ``basic_arithmetic``
tasks; reasoning-gym's scorer labels them (it never reaches the verifier). The tasks are split
in two: the threshold is fitted on the first half, AUROC, expected calibration error and the
largest useful best-of-N are measured on the second. The calibration file records where the
threshold came from; the verifier uses a threshold only from such a file.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from dataclasses import dataclass

from rmesh.domain import Candidate
from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.solver_svc.prompt import build_grammar, build_prompt, parse_response
from rmesh.verifier_svc.checkers import REGISTRY
from rmesh.verifier_svc.scorers import GenerativeJudge


@dataclass(frozen=True)
class Labelled:
    task: int
    candidate: Candidate
    correct: bool
    score: float = 0.0


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def expected_calibration_error(scores: list[float], labels: list[bool], bins: int = 10) -> float:
    total, error = len(scores), 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [(s, y) for s, y in zip(scores, labels) if low <= s < high or (b == bins - 1 and s == 1.0)]
        if members:
            confidence = statistics.mean(s for s, _ in members)
            accuracy = statistics.mean(1.0 if y else 0.0 for _, y in members)
            error += len(members) / total * abs(accuracy - confidence)
    return error


def fit_threshold(scores: list[float], labels: list[bool]) -> float:
    """The threshold with the best balanced accuracy (Youden's J) on the fitting half."""
    best, best_j = 1.0, -1.0
    positives = sum(labels) or 1
    negatives = (len(labels) - sum(labels)) or 1
    for t in sorted(set(scores)):
        tpr = sum(1 for s, y in zip(scores, labels) if y and s >= t) / positives
        fpr = sum(1 for s, y in zip(scores, labels) if not y and s >= t) / negatives
        if tpr - fpr > best_j:
            best, best_j = t, tpr - fpr
    return best


def best_of_n_curve(items: list[Labelled], k: int) -> dict[int, float]:
    """Accuracy of picking the top-scored of the first N candidates of each task, N = 1..k."""
    by_task: dict[int, list[Labelled]] = {}
    for item in items:
        by_task.setdefault(item.task, []).append(item)
    curve = {}
    for n in range(1, k + 1):
        picks = [max(group[:n], key=lambda i: i.score).correct for group in by_task.values()]
        curve[n] = sum(picks) / len(picks)
    return curve


def largest_supported_n(curve: dict[int, float]) -> int:
    """Grow N while the learned pick does not get worse: past that, more samples only feed
    over-optimisation of the proxy."""
    n = 1
    while n + 1 in curve and curve[n + 1] >= curve[n]:
        n += 1
    return n


async def generate_candidates(engine, size: int, k: int, seed: int) -> tuple[list[Labelled], list[str]]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(
        "basic_arithmetic", min_terms=2, max_terms=3, min_digits=1, max_digits=1, size=size, seed=seed
    )
    items, problems = [], []
    grammar = build_grammar({}, numeric_answer=True, max_checkpoints=3)
    for index, entry in enumerate(dataset):
        problem = f"What is {entry['metadata']['expression']}?"
        prompt = build_prompt(problem, {}, numeric_answer=True)
        greedy = await engine.generate(GenerationRequest(prompt, 1, SamplingParams(max_new_tokens=120, temperature=0), grammar))
        sampled = await engine.generate(
            GenerationRequest(prompt, k - 1, SamplingParams(max_new_tokens=120, temperature=0.9, seed=seed + index), grammar)
        )
        for j, result in enumerate(greedy + sampled):
            candidate = parse_response(f"t{index}c{j}", result.text)
            items.append(Labelled(index, candidate, dataset.score_answer(candidate.final_answer, entry) == 1.0))
        problems.append(problem)
    return items, problems


def checker_latencies(runs: int = 30) -> dict:
    samples = {
        "arithmetic": ({"expression": "6 * 7 - 5"}, "37"),
        "expression_target": ({"numbers": [9, 2, 3], "target": 21}, "9*2 + 3"),
        "json_schema": ({"schema": {"type": "object", "required": ["eta"]}}, '{"eta": "tomorrow"}'),
        "regex": ({"pattern": r"ETA: \d{4}-\d{2}-\d{2}"}, "ETA: 2026-12-01"),
        "route_constraints": ({"start": "A", "end": "C", "blocked": [["B", "C"]]}, "A -> D -> C"),
        "python_tests": ({"tests": "assert add(2, 3) == 5"}, "def add(a, b):\n    return a + b"),
    }
    out = {}
    for name, (params, answer) in samples.items():
        checker = REGISTRY[name]
        prepared = checker.prepare(params, "params")
        times = []
        for _ in range(runs if name != "python_tests" else 10):
            started = time.perf_counter()
            assert checker.check(answer, prepared).passed, name
            times.append(time.perf_counter() - started)
        out[name] = {"p50_ms": round(statistics.median(times) * 1000, 3), "runs": len(times)}
    sandbox = out["python_tests"]
    sandbox_rate = round(1000 / sandbox["p50_ms"], 2)
    return {"checkers": out, "sandbox_checks_per_second": sandbox_rate}


async def calibrate(engine, *, size: int, k: int, seed: int, calibration_path: str, report_path: str) -> dict:
    judge = GenerativeJudge(engine)
    items, problems = await generate_candidates(engine, size, k, seed)
    scored: list[Labelled] = []
    for index, problem in enumerate(problems):
        group = [i for i in items if i.task == index]
        scores = await judge.outcome(problem, [i.candidate for i in group])
        scored += [Labelled(i.task, i.candidate, i.correct, s) for i, s in zip(group, scores)]
    half = size // 2
    fit = [i for i in scored if i.task < half]
    held = [i for i in scored if i.task >= half]
    threshold = fit_threshold([i.score for i in fit], [i.correct for i in fit])
    held_scores, held_labels = [i.score for i in held], [i.correct for i in held]
    curve = best_of_n_curve(held, k)
    calibration = {
        "scorer": judge.name,
        "threshold": round(threshold, 6),
        "max_n": largest_supported_n(curve),
        "auroc": round(auroc(held_scores, held_labels), 4),
        "ece": round(expected_calibration_error(held_scores, held_labels), 4),
        "source": {
            "command": f"rmesh verifier calibrate --size {size} --k {k} --seed {seed}",
            "dataset": "reasoning-gym basic_arithmetic, 1-digit operands, 2-3 terms",
            "tasks": size,
            "candidates_per_task": k,
            "fit_tasks": half,
            "held_out_tasks": size - half,
            "held_out_positives": sum(held_labels),
            "held_out_negatives": len(held_labels) - sum(held_labels),
            "labels": "reasoning-gym score_answer == 1.0",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    pathlib.Path(calibration_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(calibration_path).write_text(json.dumps(calibration, indent=2) + "\n")
    report = {
        "judge": {**calibration, "best_of_n_accuracy_by_judge": curve},
        **checker_latencies(),
        "engine": engine.model_name,
    }
    pathlib.Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report
