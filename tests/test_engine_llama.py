"""The embedded engine on the real Gemma 3 270M model: batched branches, grammar, continuous
batching across calls, fair admission, token-exact reuse, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.engine import llama
from rmesh.engine.llama import LlamaEngine
from rmesh.errors import DeadlineExceeded, InvalidRequest
from rmesh.solver_svc.prompt import build_grammar, build_prompt, parse_response

PROMPT = "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n"


def test_kv_geometry_comes_from_the_gguf(engine):
    # Gemma 3 270M: 18 layers, one KV head of 256 dims; f16 cache = 2*18*1*256*2 bytes/token.
    assert (engine.kv.layers, engine.kv.kv_heads, engine.kv.head_dim) == (18, 1, 256)
    assert engine.kv.bytes_per_token == 18432


async def test_branches_share_one_prefix_evaluation(engine):
    """Branches 1..N-1 get the whole prompt from the shared copy and report it as cached."""
    results = await engine.generate(
        GenerationRequest(PROMPT + "x", n=4, sampling=SamplingParams(max_new_tokens=8, temperature=0.9, seed=5))
    )
    assert len(results) == 4
    prompt_tokens = results[0].prompt_tokens
    assert all(r.prompt_tokens == prompt_tokens for r in results)
    assert [r.cached_tokens for r in results[1:]] == [prompt_tokens] * 3
    assert all(0 < r.completion_tokens <= 8 for r in results)
    assert all(r.finish_reason in ("stop", "length") for r in results)


async def test_consecutive_requests_reuse_the_common_prefix(engine):
    await engine.generate(GenerationRequest(PROMPT, n=1, sampling=SamplingParams(max_new_tokens=2, temperature=0)))
    (again,) = await engine.generate(GenerationRequest(PROMPT, n=1, sampling=SamplingParams(max_new_tokens=2, temperature=0)))
    assert again.cached_tokens == again.prompt_tokens - 1


async def test_grammar_keeps_branches_on_the_template(engine):
    evidence = {"carrier": "Laptop at the regional hub; delivery tomorrow."}
    grammar = build_grammar(evidence, numeric_answer=False, max_checkpoints=1, required=["carrier"], max_line_chars=40)
    results = await engine.generate(
        GenerationRequest(
            build_prompt("When does my laptop arrive?", evidence, numeric_answer=False),
            n=2,
            sampling=SamplingParams(max_new_tokens=120, temperature=0.8, seed=11),
            grammar=grammar,
        )
    )
    for result in results:
        candidate = parse_response("b", result.text)
        assert result.finish_reason == "stop", result.text
        assert candidate.well_formed, result.text
        assert candidate.checkpoints[0].cites == ("carrier",)
        assert candidate.checkpoints[0].text == evidence["carrier"]


async def test_concurrent_callers_get_complete_independent_results(engine):
    """Two callers at once both get complete, independent results."""
    params = SamplingParams(max_new_tokens=6, temperature=0)
    a, b = await asyncio.gather(
        engine.generate(GenerationRequest(PROMPT, n=2, sampling=params)),
        engine.generate(GenerationRequest(PROMPT.replace("colours", "animals"), n=1, sampling=params)),
    )
    assert len(a) == 2 and len(b) == 1
    assert a[0].prompt_tokens != b[0].prompt_tokens or a[0].text != b[0].text
    assert not engine.stats.busy


async def test_deadline_cancels_engine_work(engine):
    cancelled_before = engine.stats.jobs_cancelled
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await engine.generate(
            GenerationRequest(
                PROMPT, n=2, sampling=SamplingParams(max_new_tokens=400, temperature=0.9), deadline=time.monotonic() + 0.2
            )
        )
    assert time.monotonic() - started < 2.0
    assert engine.stats.jobs_cancelled == cancelled_before + 1
    assert not engine.stats.busy


async def test_tree_nodes_share_the_root_prefix_in_one_batch(engine):
    """Two nodes with a common root: each node's tail is decoded once, its branches copy it."""
    root = PROMPT + "Here are three: red,"
    nodes = [
        GenerationRequest(root + " green,", n=2, sampling=SamplingParams(max_new_tokens=4, temperature=0.7, seed=3), logprobs=True),
        GenerationRequest(root + " blue and", n=1, sampling=SamplingParams(max_new_tokens=4, temperature=0.7, seed=4), logprobs=True),
    ]
    first, second = await engine.generate_many(nodes)
    assert len(first) == 2 and len(second) == 1
    assert first[1].cached_tokens == first[1].prompt_tokens
    shared = engine.count_tokens(root)
    assert shared - 1 <= second[0].cached_tokens < second[0].prompt_tokens
    for result in (*first, *second):
        assert result.completion_tokens > 0
        assert result.logprob < 0


def long(n: int = 1, tokens: int = 200, seed: int = 1, owner: str = "") -> GenerationRequest:
    return GenerationRequest(
        PROMPT, n=n, sampling=SamplingParams(max_new_tokens=tokens, temperature=0.9, seed=seed, ignore_eos=True), owner=owner
    )


async def until(condition, timeout: float = 30.0) -> None:
    stop = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < stop, "timed out"
        await asyncio.sleep(0.01)


async def test_a_call_joins_the_running_batch_at_the_next_step(engine):
    """A short call that arrives while a long one decodes finishes first: it does not wait."""
    engine.stats.peak_calls_per_step = 0
    running = asyncio.create_task(engine.generate(long(tokens=300)))
    await until(lambda: engine.stats.busy)
    (short,) = await engine.generate(GenerationRequest(PROMPT, sampling=SamplingParams(max_new_tokens=4, temperature=0)))
    assert not running.done() and short.completion_tokens > 0
    assert engine.stats.peak_calls_per_step >= 2
    (first,) = await running
    assert first.completion_tokens == 300


async def test_cancelling_one_call_leaves_the_calls_batched_with_it(engine):
    cancelled_before = engine.stats.jobs_cancelled
    doomed = asyncio.create_task(engine.generate(long(n=2, tokens=400, seed=2)))
    kept = asyncio.create_task(engine.generate(long(n=2, tokens=60, seed=3)))
    await until(lambda: engine.stats.calls_decoding == 2)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    results = await kept
    assert [r.completion_tokens for r in results] == [60, 60]
    await until(lambda: engine.stats.jobs_cancelled == cancelled_before + 1)
    await until(lambda: not engine.stats.busy)


async def test_an_engine_error_ends_its_own_call_and_no_other(engine, monkeypatch):
    """A grammar that no token satisfies (forced here) ends that call with INVALID_ARGUMENT
    naming the grammar; the call decoding beside it completes."""

    def refuse(branch, index):
        raise InvalidRequest("grammar", "no token satisfies the grammar")

    monkeypatch.setattr(engine, "_sample_constrained", refuse)
    other = asyncio.create_task(engine.generate(long(tokens=80, seed=4)))
    await until(lambda: engine.stats.busy)
    with pytest.raises(InvalidRequest) as info:
        await engine.generate(GenerationRequest(PROMPT, sampling=SamplingParams(max_new_tokens=8), grammar='root ::= "zqzqzq"'))
    assert info.value.field == "grammar"
    (result,) = await other
    assert result.completion_tokens == 80


async def test_a_grammar_llama_cpp_rejects_fails_that_call_alone(engine):
    other = asyncio.create_task(engine.generate(long(tokens=60, seed=5)))
    await until(lambda: engine.stats.busy)
    with pytest.raises(InvalidRequest) as info:
        await engine.generate(GenerationRequest(PROMPT, grammar="root ::= ("))
    assert info.value.field == "grammar"
    (result,) = await other
    assert result.completion_tokens == 60


async def test_the_owner_with_fewest_live_branches_is_admitted_first(engine, monkeypatch):
    """Four sequences in all. Owner a holds them with a long and a short call and has a third
    waiting; owner b's call, though it came later, takes the room the short call leaves (first
    come, first served would finish a2, a3, b). The starvation bound is set out of reach: on a
    loaded machine a3 could otherwise wait long enough to hold the line."""
    monkeypatch.setattr(llama, "_STARVING_SECONDS", 3600.0)
    done: list[str] = []

    async def run(name: str, request: GenerationRequest) -> None:
        await engine.generate(request)
        done.append(name)

    tasks = [asyncio.create_task(run("a1", long(n=2, tokens=240, owner="a")))]
    await until(lambda: engine.stats.busy)
    tasks.append(asyncio.create_task(run("a2", long(n=2, tokens=10, owner="a"))))
    await until(lambda: engine.stats.calls_decoding == 2)
    tasks.append(asyncio.create_task(run("a3", long(n=2, tokens=10, owner="a"))))
    await until(lambda: engine.stats.calls_waiting == 1)
    tasks.append(asyncio.create_task(run("b", long(n=2, tokens=10, owner="b"))))
    await asyncio.gather(*tasks)
    assert done[:3] == ["a2", "b", "a3"], done


async def test_a_call_that_does_not_fit_now_waits_for_room_and_completes():
    """Two calls that each need most of a 1024-cell context: the second waits, then runs."""
    small = LlamaEngine.load(n_ctx=1024, max_branches=4)
    try:
        small.stats.peak_calls_per_step = 0
        first, second = await asyncio.gather(small.generate(long(n=2, tokens=400)), small.generate(long(n=2, tokens=400, seed=9)))
        assert [r.completion_tokens for r in first + second] == [400] * 4
        assert small.stats.peak_calls_per_step == 1
    finally:
        await small.aclose()


async def test_a_continuation_reuses_its_parents_exact_tokens(engine):
    """A child sent as the parent's prompt plus the parent's output ids finds every token but
    the last in the kept sequence: nothing is re-tokenised or read again."""
    (parent,) = await engine.generate(GenerationRequest(PROMPT, sampling=SamplingParams(max_new_tokens=12, temperature=0.9, seed=6)))
    assert len(parent.output_ids) == parent.completion_tokens > 0
    child = GenerationRequest(
        PROMPT + parent.text, sampling=SamplingParams(max_new_tokens=4, temperature=0.9, seed=7),
        prefix=PROMPT, continuation_ids=parent.output_ids,
    )
    (result,) = await engine.generate(child)
    assert result.prompt_tokens == parent.prompt_tokens + parent.completion_tokens
    assert result.cached_tokens == result.prompt_tokens - 1


async def test_continuation_ids_outside_the_vocabulary_are_refused(engine):
    bad = GenerationRequest(PROMPT + "x", prefix=PROMPT, continuation_ids=(1, -3))
    with pytest.raises(InvalidRequest) as info:
        await engine.generate(bad)
    assert info.value.field == "continuation_ids"


@pytest.mark.parametrize("strategy", ["beam", "mcts"])
async def test_tree_search_children_reuse_their_parents_exact_tokens(engine, monkeypatch, strategy):
    """Through the solver, from a cold cache: each node's path comes back as token ids and its
    children find it in the kept sequences, so of all prompt tokens only the first prompt and
    one token per expanded node (its last, read again for logits) are computed anew."""
    from opentelemetry import trace

    from rmesh.domain import Budget, CheckSpec, SearchParams, TaskSpec
    from rmesh.mesh.in_process import InProcessVerifier
    from rmesh.solver_svc.core import SolverCore
    from rmesh.solving import SolveRequest
    from rmesh.verifier_svc.core import VerifierCore

    calls: list[list[list]] = []
    generate_many = engine.generate_many

    async def spy(requests):
        grouped = await generate_many(requests)
        calls.append(grouped)
        return grouped

    async def quiet(_progress) -> None:
        return None

    monkeypatch.setattr(engine, "generate_many", spy)
    core = SolverCore(engine, InProcessVerifier(VerifierCore(), trace.get_tracer("test")))
    request = SolveRequest(
        problem="What is 9 + 8 + 2?",
        task=TaskSpec("sum", (CheckSpec("arithmetic", {"expression": "9 + 8 + 2"}),)),
        strategy=strategy,
        budget=Budget(4000, 12, 3, 120, 40),
        search=SearchParams(beam_width=2, branching_factor=2, no_improvement_rounds=0),
        seed=3,
    )
    await engine.reset_cache()
    await core.solve(request, quiet)
    assert len(calls) >= 2, "the search must expand nodes past the root"
    first_prompt = calls[0][0][0].prompt_tokens
    nodes = sum(len(grouped) for grouped in calls)  # one prompt per expanded node (the root too)
    branches = [r for grouped in calls for results in grouped for r in results]
    prompt_tokens = sum(r.prompt_tokens for r in branches)
    cached = sum(r.cached_tokens for r in branches)
    assert prompt_tokens - cached <= first_prompt + nodes
    assert cached / (prompt_tokens - first_prompt) >= 0.99


async def test_calls_arriving_together_read_their_shared_prompt_once(engine):
    """Two calls whose prompts share a long prefix arrive at once: the second waits for the
    first to read it and copies it, as a radix cache would, instead of reading it beside it."""
    base = build_prompt("What is 4 + 7 + 2?", {}, numeric_answer=True)
    other = build_prompt("What is 9 + 3 + 5?", {}, numeric_answer=True)
    params = SamplingParams(max_new_tokens=4, temperature=0.9, seed=8)
    await engine.reset_cache()
    (a,), (b,) = await asyncio.gather(
        engine.generate(GenerationRequest(base, sampling=params)), engine.generate(GenerationRequest(other, sampling=params))
    )
    shared = _common(engine.tokenize(base), engine.tokenize(other))
    assert shared > 200
    assert sorted([a.cached_tokens, b.cached_tokens]) == [0, shared]


def _common(x: list[int], y: list[int]) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


async def test_reuse_never_crosses_owners(engine):
    """Cached-token counts reach the caller: a tenant must not learn from them what another
    tenant sent. The same prompt from another owner is read afresh; from the same owner, not."""
    prompt = build_prompt("Which parcel holds the lamps?", {"parcel": "Parcel 2 holds the lamps."}, numeric_answer=False)
    params = SamplingParams(max_new_tokens=2, temperature=0)
    await engine.reset_cache()
    (first,) = await engine.generate(GenerationRequest(prompt, sampling=params, owner="tenant-a"))
    (other,) = await engine.generate(GenerationRequest(prompt, sampling=params, owner="tenant-b"))
    (same,) = await engine.generate(GenerationRequest(prompt, sampling=params, owner="tenant-a"))
    assert first.cached_tokens == 0 and other.cached_tokens == 0
    assert same.cached_tokens == same.prompt_tokens - 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (GenerationRequest(PROMPT, n=1.5), "n"),
        (GenerationRequest(PROMPT, sampling=SamplingParams(max_new_tokens=-5)), "sampling.max_new_tokens"),
        (GenerationRequest(PROMPT, sampling=SamplingParams(top_k=1 << 40)), "sampling.top_k"),
        (GenerationRequest(PROMPT, sampling=SamplingParams(temperature=float("nan"))), "sampling.temperature"),
        (GenerationRequest(PROMPT, sampling=SamplingParams(seed=-1)), "sampling.seed"),
    ],
)
async def test_what_the_c_interface_cannot_take_is_refused_naming_the_field(engine, request_, field):
    with pytest.raises(InvalidRequest) as info:
        await engine.generate(request_)
    assert info.value.field == field
    (still,) = await engine.generate(GenerationRequest(PROMPT, sampling=SamplingParams(max_new_tokens=2, temperature=0)))
    assert still.completion_tokens > 0


async def test_a_failing_worker_fails_its_callers_and_the_engine_reports_unhealthy(monkeypatch):
    """A bug in a step must not leave callers waiting forever: they get UNAVAILABLE, the engine
    says it is not healthy (the solver then turns NOT_SERVING) and refuses new calls."""
    from rmesh.errors import Unavailable

    broken = LlamaEngine.load(n_ctx=512, max_branches=2)
    try:
        def fail() -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(broken, "_step", fail)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(broken.generate(long(tokens=4)), 30)
        assert not await broken.healthy()
        with pytest.raises(Unavailable):
            await broken.generate(long(tokens=4))
    finally:
        await broken.aclose()
