"""Prefix reuse through SGLang's real model gateway: `smg` (its Rust binary, from PyPI) in front
of two SGLang stand-ins (tests/sglang_standin.py, a test double whose cached_tokens emulate
each worker's radix cache). Writes bench/out/gateway.json.

prefix_reuse_ratio per strategy: cached prompt tokens ÷ shareable prefix tokens, where every
branch's prompt but its last token is shareable (the warm-up puts each prompt in a worker's
cache first). With the cache-aware policy a prompt's warm-up and its branches meet on one
worker; round robin, the baseline, scatters them. The same request and search as bench.solver.
"""

from __future__ import annotations

import asyncio
import pathlib
import socket
import subprocess
import sys
import time

import httpx

from bench.common import local_verifier, machine, no_progress, write
from bench.solver import request
from rmesh.domain import Budget, SearchParams
from rmesh.engine.instant import DEFAULT_TEXT
from rmesh.engine.sglang import SGLangEngine
from rmesh.solver_svc.core import SolverCore

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from sglang_standin import FakeSGLang, StandIn  # noqa: E402  (the test double lives with the tests)

SMG = pathlib.Path(sys.executable).parent / "smg"
STEP_TEXT = "<checkpoint>2 + 3 = 5</checkpoint>\n"
STRATEGIES = {
    "best_of_n_8": ("best_of_n", Budget(4000, 8, 4, 120, 120), SearchParams(samples=8)),
    "self_consistency_6": ("self_consistency", Budget(4000, 6, 4, 120, 120), SearchParams(samples=6)),
    "beam": ("beam", Budget(6000, 16, 3, 120, 80), SearchParams(beam_width=2, branching_factor=3)),
    "mcts": ("mcts", Budget(6000, 16, 3, 120, 80), SearchParams(branching_factor=2)),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(policy: str, workers: list[StandIn]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [str(SMG), "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
         "--worker-urls", *(w.url for w in workers), "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/generate", json={"text": "ping", "sampling_params": {"max_new_tokens": 0}}, timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("the gateway never registered its workers")


async def measure(policy: str) -> dict:
    FakeSGLang.reset()
    FakeSGLang.text = DEFAULT_TEXT
    workers = [StandIn().start(), StandIn().start()]
    process, url = start_gateway(policy, workers)
    out = {}
    try:
        for name, (strategy, budget, search) in STRATEGIES.items():
            FakeSGLang.reset()  # cold caches on both workers for each strategy
            # Step strategies get one checkpoint per call, so their nodes are continued.
            FakeSGLang.text = STEP_TEXT if strategy in ("beam", "mcts") else DEFAULT_TEXT
            engine = SGLangEngine(url)
            await engine.describe()  # as the solver does at start: the model, hence its chat template
            core = SolverCore(engine, local_verifier(), answer_style="free")
            result = await core.solve(request(strategy, budget, search), no_progress)
            await engine.aclose()
            branch_prompts = [r for r in FakeSGLang.requests if r["sampling_params"].get("max_new_tokens", 1) != 0]
            copies = sum(r["sampling_params"].get("n", 1) for r in branch_prompts)
            shareable = result.usage.prompt_tokens - copies  # all but each branch's last prompt token
            out[name] = {
                "ratio": round(result.usage.cached_tokens / shareable, 4) if shareable else 0.0,
                "cached_tokens": result.usage.cached_tokens,
                "shareable_prefix_tokens": shareable,
                "branches": copies,
                "workers_used": len(set(FakeSGLang.workers)),
            }
    finally:
        process.terminate()
        process.wait()
        for worker in workers:
            worker.stop()
    return out


async def main() -> None:
    cache_aware = await measure("cache_aware")
    round_robin = await measure("round_robin")
    payload = {
        "machine": machine(),
        "gateway": "smg 1.13.0 (PyPI), two SGLang stand-in workers (a test double: cached_tokens emulate each worker's radix cache)",
        "prefix_reuse_ratio": {"cache_aware": cache_aware, "round_robin_baseline": round_robin},
        "goal": "cache_aware >= 0.99 for every strategy",
    }
    write("gateway.json", payload)
    print("prefix reuse through the gateway (cache_aware / round_robin): " + ", ".join(
        f"{name} {cache_aware[name]['ratio']} / {round_robin[name]['ratio']}" for name in STRATEGIES
    ))


if __name__ == "__main__":
    asyncio.run(main())
