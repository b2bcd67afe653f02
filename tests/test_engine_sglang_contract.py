"""Contract test for the SGLang engine against the local stand-in (tests/sglang_standin.py), a
test double that follows the request and response shapes SGLang documents."""

from __future__ import annotations

import pytest
from sglang_standin import FakeSGLang, StandIn

from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.engine.sglang import SGLangEngine
from rmesh.errors import Unavailable


@pytest.fixture
def sglang_url():
    FakeSGLang.reset()
    standin = StandIn().start()
    yield standin.url
    standin.stop()


async def test_warms_prefix_then_fans_out_identical_prompts(sglang_url):
    engine = SGLangEngine(sglang_url)
    request = GenerationRequest("shared prompt text here", n=3, sampling=SamplingParams(max_new_tokens=16), grammar='root ::= "x"')
    results = await engine.generate(request)
    warm, fan_out = FakeSGLang.requests
    assert warm["text"] == [request.prompt] and warm["sampling_params"][0]["max_new_tokens"] == 0
    assert fan_out["text"] == [request.prompt] * 3
    assert all(p["ebnf"] == 'root ::= "x"' and p["max_new_tokens"] == 16 for p in fan_out["sampling_params"])
    assert [r.text for r in results] == ["branch 0", "branch 1", "branch 2"]
    assert all(r.cached_tokens == 3 and r.prompt_tokens == 4 and r.finish_reason == "stop" for r in results)
    assert await engine.healthy()
    await engine.aclose()


async def test_malformed_json_is_unavailable(sglang_url):
    FakeSGLang.malformed = True
    engine = SGLangEngine(sglang_url)
    with pytest.raises(Unavailable, match="malformed JSON"):
        await engine.generate(GenerationRequest("p", n=1))
    await engine.aclose()


async def test_unreachable_engine_is_unavailable():
    engine = SGLangEngine("http://127.0.0.1:9")
    with pytest.raises(Unavailable):
        await engine.generate(GenerationRequest("p", n=1))
    assert not await engine.healthy()
    await engine.aclose()


async def test_tree_nodes_warm_each_prompt_and_sum_logprobs(sglang_url):
    """Two nodes: each distinct prompt is warmed once, branches are grouped back per node."""
    engine = SGLangEngine(sglang_url)
    a = GenerationRequest("root step one", n=2, sampling=SamplingParams(max_new_tokens=8), logprobs=True)
    b = GenerationRequest("root step two", n=1, sampling=SamplingParams(max_new_tokens=8), logprobs=True)
    grouped = await engine.generate_many([a, b])
    warm, fan_out = FakeSGLang.requests
    assert warm["text"] == ["root step one", "root step two"]
    assert fan_out["text"] == ["root step one", "root step one", "root step two"]
    assert fan_out["return_logprob"] is True
    assert [len(g) for g in grouped] == [2, 1]
    assert grouped[0][0].logprob == pytest.approx(-0.5)
    await engine.aclose()
