"""Throughput of the embedded engine under concurrent requests. Writes bench/out/throughput.json.

- cross_request: the same Best-of-8 requests (reasoning-gym chain sums, fixed seeds) through the
  solver core with the real in-process verifier, 8 at a time, in three modes:
  ``previous_engine``, one call at a time on llama.cpp's default thread count (the engine as it
  was before continuous batching); ``one_call_at_a_time`` on this machine's cores; and
  ``continuous_batching``, every call's branches in one batch. Requests per second, p50 latency
  and accuracy for each; the batching ratio is taken against each serial mode.
- Each mode's CPU share: the process's CPU seconds over wall seconds times the threads the
  engine uses (at most the cores). Well under 1 means something else had the cores.
- decode_width: one prompt, N branches of 48 tokens each, for N in WIDTHS: generated tokens per
  second. How far a wider step still pays on this machine is what sizes
  RMESH_MAX_PARALLEL_BRANCHES.

``--parts`` runs some of them; the file keeps the figures of parts not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from bench.common import OUT, local_verifier, machine, no_progress, write
from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.domain import Budget, CheckSpec, SearchParams, TaskSpec
from rmesh.engine.llama import LlamaEngine, available_cores
from rmesh.solver_svc.core import SolverCore
from rmesh.solving import SolveRequest

REQUESTS = 16
CONCURRENCY = 8
SEED = 7


def tasks() -> list[tuple[SolveRequest, object, dict]]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("chain_sum", size=REQUESTS, seed=SEED, min_terms=2, max_terms=3, min_digits=1, max_digits=1)
    out = []
    for index, entry in enumerate(dataset):
        expression = entry["metadata"]["expression"]
        request = SolveRequest(
            problem=f"What is {expression}?",
            task=TaskSpec("chain_sum", (CheckSpec("arithmetic", {"expression": expression}),)),
            strategy="best_of_n",
            budget=Budget(max_tokens=2400, max_branches=8, max_depth=4, wall_clock_seconds=600, max_tokens_per_branch=160),
            search=SearchParams(samples=8),
            seed=SEED + index,
            tenant=f"tenant-{index % 2}",
        )
        out.append((request, dataset, entry))
    return out


async def run(core: SolverCore, work: list) -> dict:
    gate = asyncio.Semaphore(CONCURRENCY)
    latencies: list[float] = []
    correct = 0
    tokens = 0

    async def one(request, dataset, entry) -> None:
        nonlocal correct, tokens
        async with gate:
            started = time.monotonic()
            result = await core.solve(request, no_progress)
            latencies.append(time.monotonic() - started)
        tokens += result.usage.completion_tokens
        answer = result.best.final_answer if result.eligible and result.best else ""
        correct += dataset.score_answer(answer, entry) == 1.0

    cpu = time.process_time()
    started = time.monotonic()
    await asyncio.gather(*(one(*item) for item in work))
    wall = time.monotonic() - started
    cpu = time.process_time() - cpu
    return {
        "requests": len(work),
        "concurrency": CONCURRENCY,
        "wall_seconds": round(wall, 2),
        "requests_per_second": round(len(work) / wall, 4),
        "latency_p50_seconds": round(statistics.median(latencies), 2),
        "correct": correct,
        "completion_tokens": tokens,
        "cpu_share": round(cpu / (wall * min(core.engine.threads, available_cores())), 3),
    }


N_CTX = 16384
MAX_BRANCHES = 64
MODES = (  # name, threads (None: the machine's cores), calls batched together
    ("previous_engine", "llama.cpp default", False),
    ("one_call_at_a_time", None, False),
    ("continuous_batching", None, True),
)


WIDTHS = (1, 4, 8, 16, 32)


async def decode_width() -> dict:
    engine = LlamaEngine.load(n_ctx=N_CTX, max_branches=max(WIDTHS))
    prompt = "<start_of_turn>user\nCount from one to fifty in words.<end_of_turn>\n<start_of_turn>model\n"
    sampling = SamplingParams(max_new_tokens=48, temperature=0.9, seed=5, ignore_eos=True)
    await engine.generate(GenerationRequest(prompt, n=2, sampling=sampling))  # read the prompt once
    rows = {}
    for width in WIDTHS:
        started = time.monotonic()
        results = await engine.generate(GenerationRequest(prompt, n=width, sampling=sampling))
        seconds = time.monotonic() - started
        rows[str(width)] = {"seconds": round(seconds, 2), "tokens_per_second": round(sum(r.completion_tokens for r in results) / seconds, 1)}
        print("width", width, rows[str(width)], flush=True)
    threads = engine.threads
    await engine.aclose()
    return {"threads": threads, "tokens_per_branch": 48, "by_branches": rows}


async def cross_request() -> dict:
    import llama_cpp

    work = tasks()
    modes = {}
    for name, threads, batch_calls in MODES:
        count = llama_cpp.llama_context_default_params().n_threads if threads else None
        engine = LlamaEngine.load(n_ctx=N_CTX, max_branches=MAX_BRANCHES, threads=count)
        engine.batch_calls = batch_calls
        modes[name] = {"threads": engine.threads, **await run(SolverCore(engine, local_verifier()), work)}
        modes[name]["peak_calls_per_step"] = engine.stats.peak_calls_per_step
        model_name = engine.model_name
        await engine.aclose()
        print(name, modes[name], flush=True)
    batched = modes["continuous_batching"]

    def ratios(serial: dict) -> dict:
        return {
            "requests_per_second": round(batched["requests_per_second"] / serial["requests_per_second"], 3),
            "latency_p50": round(batched["latency_p50_seconds"] / serial["latency_p50_seconds"], 3),
        }

    result = {
        "engine": model_name,
        "n_ctx": N_CTX,
        "max_parallel_branches": MAX_BRANCHES,
        **modes,
        "batching_against_previous_engine": ratios(modes["previous_engine"]),
        "batching_against_one_call_at_a_time": ratios(modes["one_call_at_a_time"]),
        "goal": "requests_per_second ratio >= 2 against the previous engine, correct no lower",
    }
    for serial in ("previous_engine", "one_call_at_a_time"):
        r = result[f"batching_against_{serial}"]
        print(
            f"continuous batching against {serial}: {r['requests_per_second']}x requests/s, p50 "
            f"{modes[serial]['latency_p50_seconds']}s -> {batched['latency_p50_seconds']}s, correct "
            f"{modes[serial]['correct']} -> {batched['correct']} of {REQUESTS}"
        )
    return result


PARTS = {"cross_request": cross_request, "decode_width": decode_width}


async def main(parts: list[str]) -> None:
    path = OUT / "throughput.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    for part in parts:
        payload[part] = await PARTS[part]()
        payload[part]["machine"] = machine()
        payload[part]["cores_available"] = available_cores()
        payload[part]["load_average"] = os.getloadavg()
    write("throughput.json", payload)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="throughput of the embedded engine")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    asyncio.run(main(parser.parse_args().parts))
