"""The embedded engine on the real Gemma 3 270M model: batched branches, grammar, queueing, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.errors import DeadlineExceeded
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


async def test_concurrent_callers_are_queued_not_interleaved(engine):
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
