"""Contract test for the SGLang engine against a local stand-in HTTP server.

The stand-in is a test double, not SGLang: it answers ``POST /generate`` with the shapes
SGLang 0.5.23 documents in ``sglang/srt/managers/io_struct.py`` and ``tokenizer_manager.py``:
a request body with ``text`` (a list for a batch) and ``sampling_params`` (a dict or a list of
dicts with ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``ebnf``); a response of
one object per batch item holding ``text`` and ``meta_info`` with ``prompt_tokens``,
``completion_tokens``, ``cached_tokens`` and ``finish_reason`` ``{"type": "stop"|"length"}``.
``GET /health_generate`` answers 200.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rmesh.engine import GenerationRequest, SamplingParams
from rmesh.engine.sglang import SGLangEngine
from rmesh.errors import Unavailable


class FakeSGLang(BaseHTTPRequestHandler):
    requests: list[dict] = []
    malformed = False

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200 if self.path == "/health_generate" else 404, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if type(self).malformed:
            self._send(200, b"{not json")
            return
        texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
        params = body["sampling_params"] if isinstance(body["sampling_params"], list) else [body["sampling_params"]] * len(texts)
        prompt_tokens = len(texts[0].split())
        items = []
        for i, p in enumerate(params):
            n = p["max_new_tokens"]
            items.append(
                {
                    "text": f"branch {i}" if n else "",
                    "output_ids": [1] * min(n, 2),
                    "meta_info": {
                        "id": f"rid_{i}",
                        "finish_reason": {"type": "length", "length": n} if n == 0 else {"type": "stop", "matched": 1},
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": min(n, 2),
                        "cached_tokens": prompt_tokens - 1 if isinstance(body["text"], list) else 0,
                        "e2e_latency": 0.01,
                        **(
                            {"output_token_logprobs": [[-0.25, 1, None], [-0.25, 1, None]][: min(n, 2)]}
                            if body.get("return_logprob")
                            else {}
                        ),
                    },
                }
            )
        self._send(200, json.dumps(items if isinstance(body["text"], list) else items[0]).encode())


@pytest.fixture
def sglang_url():
    FakeSGLang.requests = []
    FakeSGLang.malformed = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


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
