"""Contract test for the SGLang engine against the local stand-in (tests/sglang_standin.py), a
test double that follows SGLang 0.5.23's request and response shapes and refuses what SGLang
refuses; and the stand-in's own strictness, so that it cannot hide a bad request."""

from __future__ import annotations

import time

import httpx
import pytest
from sglang_standin import KV_BYTES_PER_TOKEN, FakeSGLang, StandIn

from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.engine.base import FINISH_ABORT, FINISH_LENGTH, KVGeometry
from rmesh.engine.sglang import SGLangEngine, cache_namespace, sampling_to_sglang
from rmesh.errors import Unavailable


@pytest.fixture
def sglang_url():
    FakeSGLang.reset()
    standin = StandIn().start()
    yield standin.url
    standin.stop()


async def test_warms_the_prefix_then_sends_one_prompt_with_n_copies(sglang_url):
    engine = SGLangEngine(sglang_url)
    request = GenerationRequest("shared prompt text here", n=3, sampling=SamplingParams(max_new_tokens=16, seed=7), grammar='root ::= "x"')
    results = await engine.generate(request)
    warm, fan_out = FakeSGLang.requests
    # One prompt per request, as SGLang's gateways require: a string, not a list. Work with no
    # owner has a cache namespace of its own, shared by its warm-up and its branches.
    assert warm == {"text": request.prompt, "sampling_params": {"max_new_tokens": 0}, "extra_key": fan_out["extra_key"]}
    assert fan_out["extra_key"].startswith("rmesh-call-")
    assert fan_out["text"] == request.prompt and fan_out["sampling_params"]["n"] == 3
    assert fan_out["sampling_params"]["ebnf"] == 'root ::= "x"' and fan_out["sampling_params"]["max_new_tokens"] == 16
    assert "sampling_seed" not in fan_out["sampling_params"]  # n copies would share it and come out identical
    assert [r.text for r in results] == ["branch 0", "branch 1", "branch 2"]
    # The warm-up put the prompt in the radix tree: every copy reuses all but its last token.
    assert all(r.cached_tokens == 3 and r.prompt_tokens == 4 and r.finish_reason == "stop" for r in results)
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
    """Two nodes: each distinct prompt is warmed once, each node's branches are one request."""
    engine = SGLangEngine(sglang_url)
    a = GenerationRequest("root step one", n=2, sampling=SamplingParams(max_new_tokens=8), logprobs=True)
    b = GenerationRequest("root step two", n=1, sampling=SamplingParams(max_new_tokens=8), logprobs=True)
    grouped = await engine.generate_many([a, b])
    warms = [r for r in FakeSGLang.requests if r["sampling_params"]["max_new_tokens"] == 0]
    fan_outs = [r for r in FakeSGLang.requests if r["sampling_params"]["max_new_tokens"] == 8]
    assert sorted(r["text"] for r in warms) == ["root step one", "root step two"]
    assert sorted((r["text"], r["sampling_params"].get("n", 1)) for r in fan_outs) == [("root step one", 2), ("root step two", 1)]
    assert all(r["return_logprob"] is True for r in fan_outs)
    assert [len(g) for g in grouped] == [2, 1]
    assert grouped[0][0].logprob == pytest.approx(-0.5)
    await engine.aclose()


async def test_length_and_abort_finishes_reach_the_branch(sglang_url):
    engine = SGLangEngine(sglang_url)
    (short,) = await engine.generate(GenerationRequest("one two", n=1, sampling=SamplingParams(max_new_tokens=1)))
    assert short.finish_reason == FINISH_LENGTH and short.completion_tokens == 1
    FakeSGLang.abort = True
    (aborted,) = await engine.generate(GenerationRequest("one two", n=1, sampling=SamplingParams(max_new_tokens=8)))
    assert aborted.finish_reason == FINISH_ABORT
    await engine.aclose()


def test_the_engines_sampling_parameters_are_all_ones_sglang_defines():
    params = sampling_to_sglang(SamplingParams(max_new_tokens=5, temperature=0.7, seed=3, ignore_eos=True), 'root ::= "a"')
    from sglang_standin import check_sampling

    assert check_sampling(params) == params


# -- the stand-in refuses what SGLang refuses ---------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_new_tokens": 4, "seed": 1}, "unexpected keyword argument 'seed'"),
        ({"max_new_tokens": "4"}, "sampling_params.max_new_tokens: wrong type str"),
        ({"temperature": -1.0}, "temperature must be a non-negative finite number"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "Only one of regex, json_schema, or ebnf can be set."),
    ],
)
def test_the_standin_refuses_sampling_parameters_sglang_refuses(sglang_url, params, message):
    reply = httpx.post(f"{sglang_url}/generate", json={"text": "p", "sampling_params": params}, timeout=5)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]


def test_the_standin_caches_only_prefixes_it_has_seen(sglang_url):
    def cached(prompt: str) -> int:
        reply = httpx.post(f"{sglang_url}/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 2}}, timeout=5)
        return reply.json()["meta_info"]["cached_tokens"]

    assert cached("a b c d") == 0  # cold
    assert cached("a b c d") == 3  # warm: all but the last token
    assert cached("a b x y z") == 2  # shares "a b"
    assert cached("q r s") == 0


def test_the_standins_health_takes_a_second_and_fails_while_starting(sglang_url):
    started = time.monotonic()
    assert httpx.get(f"{sglang_url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started >= 1.0
    FakeSGLang.starting = True
    assert httpx.get(f"{sglang_url}/health", timeout=5).status_code == 503
    assert httpx.get(f"{sglang_url}/ready", timeout=5).status_code == 503
    reply = httpx.post(f"{sglang_url}/generate", json={"text": "p", "sampling_params": {}}, timeout=5)
    assert reply.status_code == 503


async def test_an_engine_that_refuses_the_request_is_unavailable_with_its_message(sglang_url):
    FakeSGLang.starting = True
    engine = SGLangEngine(sglang_url)
    with pytest.raises(Unavailable) as info:
        await engine.generate(GenerationRequest("p", n=1))
    assert "SGLang /generate answered 503" in info.value.message and "the server is starting" in info.value.message
    assert not await engine.healthy()
    await engine.aclose()


async def test_the_engine_reads_the_served_model_and_its_kv_pool(sglang_url):
    engine = SGLangEngine(sglang_url)
    assert await engine.describe()
    assert engine.model_name == "google/gemma-3-270m-it"
    assert (engine.context_length, engine.kv_capacity_tokens) == (32768, 500_000)
    # KV bytes per token from the server's pool (8.58 GiB over 500 000 tokens), not a constant:
    # Gemma 3 270M's 18 432 within the two decimals SGLang rounds the pool to.
    assert abs(engine.kv_bytes_per_token - KV_BYTES_PER_TOKEN) / KV_BYTES_PER_TOKEN < 0.001
    assert engine.readiness_problem() == ""
    await engine.aclose()
    unreachable = SGLangEngine("http://127.0.0.1:9")
    assert not await unreachable.describe() and unreachable.kv_capacity_tokens == 0
    await unreachable.aclose()


async def test_grammar_forced_tokens_are_not_counted_as_choices(sglang_url):
    """SGLang's log-probabilities come after the grammar mask: forced tokens read 0."""
    FakeSGLang.logprobs = [[-0.5, 1, None], [0.0, 2, None], [-1.5, 3, None], [0.0, 4, None]]
    engine = SGLangEngine(sglang_url)
    (branch,) = await engine.generate(GenerationRequest("p q", n=1, sampling=SamplingParams(max_new_tokens=8), logprobs=True))
    assert branch.logprob == pytest.approx(-2.0) and branch.logprob_tokens == 2
    await engine.aclose()


async def test_a_continuation_sends_the_prefix_ids_and_the_parents_output_ids(sglang_url):
    """A tree node's next step reuses its parent's generated tokens exactly: the prefix's ids are
    learned once, then every continuation goes as input_ids, never as re-tokenised text."""
    from sglang_standin import token_id

    engine = SGLangEngine(sglang_url)
    prefix = "instructions and the request <response>\n"
    root = GenerationRequest(prefix, n=1, sampling=SamplingParams(max_new_tokens=4), prefix=prefix, continuation_ids=(), owner="acme")
    (first,) = await engine.generate(root)
    assert first.output_ids == tuple(token_id(w) for w in first.text.split())
    child = GenerationRequest(
        prefix + first.text, n=2, sampling=SamplingParams(max_new_tokens=4), prefix=prefix, continuation_ids=first.output_ids,
        owner="acme",
    )
    children = await engine.generate(child)
    assert len([r for r in FakeSGLang.requests if r.get("logprob_start_len") == 0]) == 1  # learned once
    fan_out = FakeSGLang.requests[-1]
    assert "text" not in fan_out
    assert fan_out["input_ids"] == [token_id(w) for w in prefix.split()] + list(first.output_ids)
    # The parent's tokens were in the cache: every prompt token but the last is reused.
    assert all(c.cached_tokens == c.prompt_tokens - 1 for c in children)
    await engine.aclose()


async def test_the_radix_cache_is_shared_within_a_tenant_and_never_across(sglang_url):
    """SGLang's radix tree is one for every caller and cached_tokens reaches the caller, so each
    tenant's work goes in its own namespace (extra_key): another tenant's prompt never counts."""
    engine = SGLangEngine(sglang_url)
    prompt = "the confidential order of tenant a holds twelve boxes"
    words = len(prompt.split())

    async def solve(owner: str) -> set[str]:
        FakeSGLang.requests.clear()
        results = await engine.generate(GenerationRequest(prompt, n=2, sampling=SamplingParams(max_new_tokens=2), owner=owner))
        assert [r.cached_tokens for r in results] == [words - 1] * 2  # its own warm-up
        return {r["extra_key"] for r in FakeSGLang.requests}

    def cached_in(namespace: str) -> int:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 1}, "extra_key": namespace}
        return httpx.post(f"{sglang_url}/generate", json=body, timeout=5).json()["meta_info"]["cached_tokens"]

    a_keys = await solve("tenant-a")
    assert a_keys == {cache_namespace("tenant-a")} and "tenant-a" not in next(iter(a_keys))  # no name in the server's logs
    assert cached_in(cache_namespace("tenant-b")) == 0  # a's prompt is not in b's namespace
    assert cached_in(cache_namespace("tenant-a")) == words - 1
    assert await solve("tenant-b") == {cache_namespace("tenant-b")} != a_keys
    # Work with no owner: each call a namespace of its own, never a tenant's.
    first, second = await solve(""), await solve("")
    assert len(first) == len(second) == 1 and first != second and not (first | second) & (a_keys | {cache_namespace("tenant-b")})
    await engine.aclose()


@pytest.mark.parametrize("key", [7, ["a"], {"k": "v"}, ["a", 1]])
def test_the_standin_refuses_an_extra_key_sglang_cannot_take(sglang_url, key):
    reply = httpx.post(f"{sglang_url}/generate", json={"text": "p", "sampling_params": {}, "extra_key": key}, timeout=5)
    assert reply.status_code == 400 and "extra_key" in reply.json()["error"]["message"]


async def test_without_ids_from_the_server_continuations_go_as_text(sglang_url):
    engine = SGLangEngine(sglang_url)
    request = GenerationRequest("p q", n=1, sampling=SamplingParams(max_new_tokens=2), prefix="p q", continuation_ids=None)
    await engine.generate(request)
    assert all("text" in r and "input_ids" not in r for r in FakeSGLang.requests)
    await engine.aclose()


async def test_an_engine_reporting_more_tokens_than_it_could_generate_is_malformed(sglang_url):
    FakeSGLang.logprobs = [[-0.1, 1, None]] * 50
    engine = SGLangEngine(sglang_url)
    with pytest.raises(Unavailable) as info:
        await engine.generate(GenerationRequest("p q", n=1, sampling=SamplingParams(max_new_tokens=8), logprobs=True))
    assert "token counts out of range" in info.value.message
    await engine.aclose()


async def test_a_server_that_does_not_report_its_kv_cost_is_not_ready_unless_configured(sglang_url):
    FakeSGLang.report_memory = False
    engine = SGLangEngine(sglang_url)
    assert await engine.describe() and engine.kv_capacity_tokens == 500_000
    assert "has not reported its KV cache size" in engine.readiness_problem()
    with pytest.raises(Unavailable, match="RMESH_SGLANG_KV_GEOMETRY"):
        engine.kv_bytes_per_token
    await engine.aclose()
    configured = SGLangEngine(sglang_url, kv=KVGeometry(layers=24, kv_heads=2, head_dim=64))
    assert await configured.describe() and configured.readiness_problem() == ""
    assert configured.kv_bytes_per_token == 2 * 24 * 2 * 64 * 2
    await configured.aclose()


async def test_prompt_tokens_are_measured_by_the_server_not_estimated(sglang_url):
    """The stand-in's tokens are words: a prompt of 40 short words is 40 tokens, where the
    bytes/3 estimate says otherwise; the warm-up that measures it also caches the prompt."""
    engine = SGLangEngine(sglang_url)
    prompt = " ".join(f"w{i}" for i in range(40))
    assert await engine.measure_tokens(prompt, None) == 40
    assert engine.count_tokens(prompt) != 40
    (branch,) = await engine.generate(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=4)))
    assert branch.cached_tokens == 39
    FakeSGLang.malformed = True
    with pytest.raises(Unavailable):
        await engine.measure_tokens(prompt, None)
    await engine.aclose()


@pytest.mark.parametrize(
    "info",
    [
        '{"model_path": "google/gemma-3-270m-it", "max_total_num_tokens": Infinity, "context_length": 1e400, "tp_size": 99999, '
        '"internal_states": [{"memory_usage": {"kvcache": Infinity, "token_capacity": 5}}]}',
        '{"model_path": "google/gemma-3-270m-it", "max_total_num_tokens": "500000", "internal_states": [{"memory_usage": {"kvcache": NaN, "token_capacity": 1}}]}',
        '{"model_path": "google/gemma-3-270m-it", "max_total_num_tokens": -5, "internal_states": [{"memory_usage": {"kvcache": 8.5, "token_capacity": true}}]}',
        '{"model_path": "google/gemma-3-270m-it", "max_total_num_tokens": 1e30, "internal_states": "x"}',
    ],
    ids=["infinities", "nan-and-strings", "negative-and-bool", "absurd"],
)
async def test_a_hostile_server_info_is_no_answer_not_a_crash(sglang_url, info):
    FakeSGLang.server_info_raw = info
    engine = SGLangEngine(sglang_url)
    assert await engine.describe()  # the model is named; nothing else is believed
    assert (engine.kv_capacity_tokens, engine.context_length, engine.reported_kv_bytes_per_token) == (0, 0, 0)
    assert "has not reported its KV cache size" in engine.readiness_problem()
    await engine.aclose()


async def test_a_model_name_with_terminal_escapes_is_cleaned(sglang_url):
    FakeSGLang.server_info_raw = '{"model_path": "\\u001b[2Jgoogle/gemma-3-270m-it\\u0007"}'
    engine = SGLangEngine(sglang_url)
    assert await engine.describe() and engine.model_name == "[2Jgoogle/gemma-3-270m-it"
    await engine.aclose()


@pytest.mark.parametrize("raw", ["Infinity", "1", "true", "-3", "4.5"])
async def test_an_impossible_prompt_count_is_malformed_not_believed(sglang_url, raw):
    """A count of 1 for a 120-byte prompt would under-reserve KV; Infinity would crash int()."""
    FakeSGLang.prompt_tokens_raw = raw
    engine = SGLangEngine(sglang_url)
    with pytest.raises(Unavailable, match="malformed"):
        await engine.measure_tokens(" ".join(f"word{i}" for i in range(20)), None)
    await engine.aclose()
