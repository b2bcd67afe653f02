"""Solver benchmark: prefix reuse, batched branching and controller overhead, in one run on the
embedded engine, with a shared prompt prefix of at least 500 tokens. Writes bench/out/solver.json.

- prefix_reuse_ratio, per strategy (best_of_n, self_consistency, beam, mcts): cached prompt
  tokens ÷ shareable prefix tokens. A branch's prompt is shareable except for the very first
  evaluation of the request's prompt: every other branch could take it, and each tree node's
  path, from KV that an earlier branch already computed.
- batched_speedup_bon8: 8 independent generations (cold cache each) ÷ one best-of-8 call with
  a shared prefix and batched decoding; every branch generates the same number of tokens. The
  threads the engine used and the run's CPU share (process CPU seconds ÷ wall seconds × threads;
  well under 1 means other work had the cores) are reported beside it. Beside it too is
  ``llama_cpp_ceiling``: the same two sides timed as llama.cpp's own decode calls on a fresh
  context (prompt read once in the engine's chunks; one step of 1 token, one step of 8), so
  with no scheduler at all. It is the most that batching can give on this machine's cores.
- controller_overhead: share of a beam search's wall time spent outside engine calls
  (prompt building, parsing, verification, bookkeeping) over at least 32 expansions.
"""

from __future__ import annotations

import asyncio
import time

from bench.common import local_verifier, machine, no_progress, write
from rmesh.domain import Budget, CheckSpec, SearchParams, TaskSpec
from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.engine.llama import LlamaEngine
from rmesh.solver_svc.core import SolverCore
from rmesh.solving import SolveRequest
from rmesh.solver_svc.prompt import build_prompt

# A warehouse ticket with long tool output: the shared prefix is the point.
EVIDENCE = {
    "order": "Order 5531 placed on 2 March: 12 boxes of A4 paper, 4 toner cartridges, 3 desk lamps, "
    "2 office chairs and 1 filing cabinet, shipped in three parcels from the north warehouse.",
    "parcel_1": "Parcel 1 holds the 12 boxes of paper; it was delivered on 4 March and signed for "
    "at the reception desk by a member of staff.",
    "parcel_2": "Parcel 2 holds the 4 toner cartridges and the 3 desk lamps; the carrier scanned it "
    "at the regional hub on 5 March and lists delivery for 7 March.",
    "parcel_3": "Parcel 3 holds the 2 office chairs and the filing cabinet; it is on hold at the "
    "north warehouse because the cabinet failed a quality inspection.",
    "returns": "Unopened consumables may be returned within 30 days; furniture may be returned within "
    "14 days if it is unassembled; returns are collected free of charge on weekdays.",
    "billing": "The customer was charged 418 in total: 96 for paper, 212 for toner, 45 for lamps, "
    "and the chairs and cabinet are billed only when they ship.",
    "inspection": "The replacement filing cabinet passed inspection on 6 March and will join parcel 3, "
    "which is expected to leave the warehouse on 8 March.",
    "contact": "The customer asked to be told before any parcel arrives and prefers e-mail over phone "
    "calls for updates about deliveries and refunds.",
}
PROBLEM = (
    "The customer asks how many of the items they ordered have already been delivered, counting "
    "each box, cartridge, lamp, chair and cabinet as one item. Answer with the number."
)
TASK = TaskSpec("support", (CheckSpec("arithmetic", {"expression": "12"}),))


def request(strategy: str, budget: Budget, search: SearchParams) -> SolveRequest:
    return SolveRequest(problem=PROBLEM, task=TASK, evidence=EVIDENCE, strategy=strategy, budget=budget, search=search, seed=7, tenant="bench")


def reuse(result, first_prompt_tokens: int) -> dict:
    shareable = result.usage.prompt_tokens - first_prompt_tokens
    return {
        "ratio": round(result.usage.cached_tokens / shareable, 4),
        "cached_tokens": result.usage.cached_tokens,
        "shareable_prefix_tokens": shareable,
        "prompt_tokens_all_branches": result.usage.prompt_tokens,
        "branches": result.candidates_evaluated,
        "stop_reason": result.stop_reason,
    }


def llama_cpp_ceiling(tokens: list[int], tokens_each: int, threads: int) -> dict:
    """The batched-versus-independent ratio of llama.cpp's decode calls alone: 8 x (read the
    prompt + ``tokens_each`` steps of one token) against (read it once + ``tokens_each`` steps of
    8 tokens, one per sequence)."""
    import llama_cpp as C

    from rmesh.engine.llama import _PREFILL_CHUNK, default_model_path

    model = C.llama_model_load_from_file(str(default_model_path()).encode(), C.llama_model_default_params())
    params = C.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = 8192, 8, True
    params.n_batch = params.n_ubatch = _PREFILL_CHUNK + 8
    params.n_threads = params.n_threads_batch = threads
    ctx = C.llama_init_from_model(model, params)
    batch = C.llama_batch_init(params.n_batch, 0, 1)

    def decode(entries: list[tuple[int, int, int]], logits_from: int) -> None:
        """One llama_decode; logits for the entries from ``logits_from`` on, as the engine asks:
        a prompt's last token, and every branch's token in a step."""
        batch.n_tokens = len(entries)
        for i, (token, pos, seq) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, int(i >= logits_from)
            batch.seq_id[i][0] = seq
        if C.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def read_prompt() -> float:
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        started = time.perf_counter()
        for at in range(0, len(tokens), _PREFILL_CHUNK):
            chunk = tokens[at : at + _PREFILL_CHUNK]
            decode([(t, at + i, 0) for i, t in enumerate(chunk)], len(chunk) - 1 if at + len(chunk) == len(tokens) else len(chunk))
        return time.perf_counter() - started

    def steps(width: int) -> float:
        mem = C.llama_get_memory(ctx)
        for seq in range(1, width):
            C.llama_memory_seq_cp(mem, 0, seq, -1, -1)
        started = time.perf_counter()
        for k in range(tokens_each):
            decode([(tokens[k % len(tokens)], len(tokens) + k, seq) for seq in range(width)], 0)
        return time.perf_counter() - started

    try:
        read_prompt()  # warm
        prompt_seconds = read_prompt()
        one = steps(1)
        read_prompt()
        eight = steps(8)
    finally:
        C.llama_batch_free(batch)
        C.llama_free(ctx)
        C.llama_model_free(model)
    return {
        "value": round(8 * (prompt_seconds + one) / (prompt_seconds + eight), 3),
        "prompt_read_seconds": round(prompt_seconds, 3),
        "step_ms_1_token": round(1000 * one / tokens_each, 2),
        "step_ms_8_tokens": round(1000 * eight / tokens_each, 2),
        "threads": threads,
    }


async def main() -> None:
    engine = LlamaEngine.load(n_ctx=8192, max_branches=8)
    core = SolverCore(engine, local_verifier(), answer_style="extractive")
    prompt = build_prompt(PROBLEM, EVIDENCE, numeric_answer=True, extractive_answer=True)
    prefix_tokens = engine.count_tokens(prompt)
    assert prefix_tokens >= 500, prefix_tokens

    await engine.reset_cache()
    bon = await core.solve(request("best_of_n", Budget(4000, 8, 4, 600, 160), SearchParams(samples=8)), no_progress)
    await engine.reset_cache()
    vote = await core.solve(request("self_consistency", Budget(4000, 8, 4, 600, 160), SearchParams(samples=8)), no_progress)
    await engine.reset_cache()
    beam_started = time.monotonic()
    beam = await core.solve(
        request("beam", Budget(20000, 64, 5, 600, 48), SearchParams(beam_width=4, branching_factor=4, no_improvement_rounds=0)),
        no_progress,
    )
    beam_wall = time.monotonic() - beam_started
    await engine.reset_cache()
    mcts = await core.solve(
        request("mcts", Budget(20000, 32, 5, 600, 48), SearchParams(branching_factor=3, no_improvement_rounds=0)), no_progress
    )

    tokens_each = 48
    sampling = SamplingParams(max_new_tokens=tokens_each, temperature=0.9, seed=11, ignore_eos=True)
    independent = 0.0
    cpu = time.process_time()
    for i in range(8):
        await engine.reset_cache()
        started = time.monotonic()
        (one,) = await engine.generate(GenerationRequest(prompt, n=1, sampling=SamplingParams(**{**sampling.__dict__, "seed": 11 + i})))
        independent += time.monotonic() - started
        assert one.completion_tokens == tokens_each
    independent_cpu = time.process_time() - cpu
    await engine.reset_cache()
    cpu = time.process_time()
    started = time.monotonic()
    batched_results = await engine.generate(GenerationRequest(prompt, n=8, sampling=sampling))
    batched = time.monotonic() - started
    batched_cpu = time.process_time() - cpu
    assert all(r.completion_tokens == tokens_each for r in batched_results)

    payload = {
        "machine": machine(),
        "engine": engine.model_name,
        "shared_prefix_tokens": prefix_tokens,
        "prefix_reuse_ratio": {
            "best_of_n_8": reuse(bon, prefix_tokens),
            "self_consistency_8": reuse(vote, prefix_tokens),
            "beam": reuse(beam, prefix_tokens),
            "mcts": reuse(mcts, prefix_tokens),
            "goal": ">= 0.99 each",
        },
        "batched_speedup_bon8": {
            "value": round(independent / batched, 3),
            "independent_seconds": round(independent, 3),
            "batched_seconds": round(batched, 3),
            "branches": 8,
            "tokens_per_branch": tokens_each,
            "threads": engine.threads,
            # CPU seconds ÷ (wall seconds × threads) for each side: well under 1, or unequal,
            # means other work had the cores during the run and the ratio is not to be trusted.
            "cpu_share_independent": round(independent_cpu / (independent * engine.threads), 3),
            "cpu_share_batched": round(batched_cpu / (batched * engine.threads), 3),
            "llama_cpp_ceiling": llama_cpp_ceiling(engine.tokenize(prompt), tokens_each, engine.threads),
            "goal": ">= 6",
        },
        "controller_overhead": {
            "value": round(1 - beam.engine_seconds / beam_wall, 4),
            "wall_seconds": round(beam_wall, 3),
            "engine_seconds": round(beam.engine_seconds, 3),
            "expansions": beam.candidates_evaluated,
            "rounds_stop_reason": beam.stop_reason,
            "goal": "<= 0.02",
        },
    }
    await engine.aclose()
    write("solver.json", payload)
    print(
        "prefix_reuse_ratio "
        + " ".join(f"{k}={v['ratio']}" for k, v in payload["prefix_reuse_ratio"].items() if k != "goal")
        + "; "
        f"batched_speedup_bon8={payload['batched_speedup_bon8']['value']} "
        f"(llama.cpp alone: {payload['batched_speedup_bon8']['llama_cpp_ceiling']['value']}); "
        f"controller_overhead={payload['controller_overhead']['value']} over {beam.candidates_evaluated} expansions"
    )


if __name__ == "__main__":
    asyncio.run(main())
