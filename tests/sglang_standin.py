"""A stand-in for SGLang's native HTTP API, for tests on machines without a GPU.

It is a test double, not SGLang, and it is at least as strict as SGLang 0.5.23 where the mesh
depends on it (checked against ``sglang/srt/sampling/sampling_params.py`` in the 0.5.23 wheel,
and the reference notes in the design docs):

- ``POST /generate`` takes ``text`` (a string, or a list for a batch) and ``sampling_params``
  (an object, or a list as long as the batch). A sampling key SGLang does not define, a value
  of the wrong type or out of SGLang's range, or two grammars at once is HTTP 400, as SGLang
  refuses them.
- ``sampling_params.n`` answers with a list of ``n`` results.
- A prompt is ``text`` or ``input_ids``. Its tokens are its whitespace-separated words, each with
  a stable id (``token_id``); ``output_ids`` are the generated words' ids, so ids sent back in
  ``input_ids`` mean exactly the tokens they came from. With ``return_logprob`` and
  ``logprob_start_len: 0`` the answer reports ``input_token_logprobs`` (the prompt's ids).
- ``meta_info.cached_tokens`` emulates the radix cache: a prompt's longest prefix (in
  whitespace tokens) shared with a prompt seen before in the same cache namespace, at most
  ``prompt_tokens - 1``; nothing is cached for a prompt never seen. The namespace is the
  body's ``extra_key`` (a string, or a list of strings as long as a batch; an empty string
  is none, as SGLang's gateway reads it); any other ``extra_key`` is HTTP 400.
- ``finish_reason`` is ``{"type": "length"}`` when the answer reaches ``max_new_tokens`` and
  ``{"type": "abort"}`` in the ``abort`` fault mode.
- ``GET /health`` and ``/health_generate`` sleep 1 s before answering and answer 503 while the
  server is ``starting``; ``GET /ready`` answers at once (503 while starting).
- ``/model_info``, ``/server_info``, ``/version`` and ``/v1/models`` describe the served model
  (``/server_info`` with the scheduler's ``internal_states[].memory_usage``: the KV pool in GiB
  rounded to two decimals, and its token capacity, as 0.5.23's ``get_internal_state`` gives them),
  which is what SGLang's gateway reads to register a worker; ``/get_load`` says how many tokens
  its KV holds (``load_tokens``).

Fault modes: ``malformed`` (a body that is not JSON), ``delay`` (seconds before answering),
``drop`` (close the connection without an answer, as a dying process does), ``abort``,
``starting``, ``fail_status`` (every /generate answered with that HTTP status).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# SGLang's API sampling parameters and their JSON types: the fields of SamplingParams in the
# sglang 0.5.23 wheel (sglang/srt/sampling/sampling_params.py). That module cannot be imported
# here (it imports torch through the watermarking package), so its field list is copied.
SAMPLING_KEYS: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "stop": (str, list), "stop_token_ids": (list,), "stop_regex": (str, list),
    "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "min_p": (int, float),
    "frequency_penalty": (int, float), "presence_penalty": (int, float), "repetition_penalty": (int, float),
    "min_new_tokens": (int,), "n": (int,), "json_schema": (str,), "regex": (str,), "ebnf": (str,),
    "structural_tag": (str,), "ignore_eos": (bool,), "skip_special_tokens": (bool,),
    "spaces_between_special_tokens": (bool,), "no_stop_trim": (bool,), "custom_params": (dict,),
    "stream_interval": (int,), "logit_bias": (dict,), "sampling_seed": (int,), "beam_width": (int,),
    "watermark": (dict,),
}


# What the stand-in says it serves (the chart's default model, SGLang's context for it).
MODEL = "google/gemma-3-270m-it"
VERSION = "0.5.23"
CONTEXT = 32768
KV_TOKENS = 500_000
# Gemma 3 270M's KV cost: 2 (K, V) x 18 layers x 1 KV head x 256 dims x 2 bytes.
KV_BYTES_PER_TOKEN = 18_432


def token_id(word: str) -> int:
    """The stand-in's tokenizer: one token per whitespace-separated word, a stable id each."""
    return int.from_bytes(word.encode()[:8].ljust(8, b"\0"), "big") % 1_000_003 + len(word) * 1_000_003


class BadRequest(Exception):
    pass


def check_sampling(params: object) -> dict:
    """What SGLang accepts as one request's sampling parameters; BadRequest otherwise."""
    if not isinstance(params, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in SAMPLING_KEYS:
            raise BadRequest(f"unexpected keyword argument '{key}' in sampling_params")
        if value is not None and (not isinstance(value, SAMPLING_KEYS[key]) or (isinstance(value, bool) and bool not in SAMPLING_KEYS[key])):
            raise BadRequest(f"sampling_params.{key}: wrong type {type(value).__name__}")
    temperature = params.get("temperature", 1.0)
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise BadRequest(f"temperature must be a non-negative finite number, got {temperature}.")
    top_p = params.get("top_p", 1.0)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.")
    top_k = params.get("top_k", -1)
    if top_k is not None and top_k != -1 and top_k < 1:
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if (params.get("max_new_tokens") or 0) < 0:
        raise BadRequest("max_new_tokens must be at least 0")
    if (params.get("n") or 1) < 1:
        raise BadRequest("n must be at least 1")
    if sum(params.get(k) is not None for k in ("json_schema", "regex", "ebnf")) > 1:
        raise BadRequest("Only one of regex, json_schema, or ebnf can be set.")
    return params


class FakeSGLang(BaseHTTPRequestHandler):
    requests: list[dict] = []
    # Each stand-in's radix tree (by port), as (namespace, token list) of the prompts it holds.
    seen: dict[int, list[tuple[str, list[int]]]] = {}
    # Which stand-in (by port) answered each /generate, in order.
    workers: list[int] = []
    malformed = False
    delay = 0.0
    drop = False
    abort = False
    starting = False
    text = "branch {i}"
    # The output_token_logprobs to report, when set; else -0.25 for every generated token.
    logprobs: list | None = None
    # Tokens /get_load says the server's KV holds (its other clients' requests).
    load_tokens = 0
    # Answer every /generate with this HTTP status and an error body (a server refusing work).
    fail_status = 0
    model = MODEL  # the model it says it serves
    # Whether /server_info carries internal_states[].memory_usage (SGLang 0.5.23 does).
    report_memory = True
    # A hostile server: raw JSON text replacing /server_info's answer, and a prompt_tokens value
    # (raw JSON text) for every answer, when set.
    server_info_raw: str | None = None
    prompt_tokens_raw: str | None = None
    lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        cls.requests, cls.seen, cls.workers = [], {}, []
        cls.malformed, cls.delay, cls.drop, cls.abort, cls.starting = False, 0.0, False, False, False
        cls.text = "branch {i}"
        cls.logprobs = None
        cls.load_tokens = 0
        cls.fail_status = 0
        cls.model = MODEL
        cls.report_memory = True
        cls.server_info_raw = cls.prompt_tokens_raw = None

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/health", "/health_generate"):
            time.sleep(1.0)  # SGLang's health handler sleeps before its first check
            self._send(503 if type(self).starting else 200, b"{}")
        elif self.path == "/ready":
            self._send(503 if type(self).starting else 200, b"{}")
        elif self.path in ("/model_info", "/get_model_info"):
            model = type(self).model
            self._send(200, json.dumps({"model_path": model, "tokenizer_path": model, "is_generation": True}).encode())
        elif self.path in ("/server_info", "/get_server_info"):
            info = {
                "model_path": type(self).model, "tp_size": 1, "context_length": CONTEXT, "max_total_num_tokens": KV_TOKENS,
                "version": VERSION,
            }
            if type(self).report_memory:
                # The scheduler's get_internal_state: one rank's KV pool in GiB, two decimals.
                kvcache = round(KV_TOKENS * KV_BYTES_PER_TOKEN / (1 << 30), 2)
                info["internal_states"] = [
                    {"memory_usage": {"weight": 0.5, "kvcache": kvcache, "token_capacity": KV_TOKENS}, "last_gen_throughput": 0.0}
                ]
            raw = type(self).server_info_raw
            self._send(200, raw.encode() if raw is not None else json.dumps(info).encode())
        elif self.path == "/get_load":
            # SGLang's legacy shape: one entry per data-parallel rank.
            load = [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": type(self).load_tokens}]
            self._send(200, json.dumps(load).encode())
        elif self.path == "/version":
            self._send(200, json.dumps({"version": VERSION}).encode())
        elif self.path == "/v1/models":
            model = {"id": type(self).model, "object": "model", "owned_by": "sglang", "root": type(self).model, "max_model_len": CONTEXT}
            self._send(200, json.dumps({"object": "list", "data": [model]}).encode())
        else:
            self._send(404, b"{}")

    def _cached(self, namespace: str, tokens: list[int]) -> int:
        """The longest prefix of ``tokens`` some earlier prompt in ``namespace`` shares (SGLang's
        radix match, which never crosses an ``extra_key``)."""
        best = 0
        for space, other in type(self).seen.get(self.server.server_address[1], []):
            if space != namespace:
                continue
            shared = 0
            for a, b in zip(tokens, other):
                if a != b:
                    break
                shared += 1
            best = max(best, shared)
        return min(best, max(0, len(tokens) - 1))

    def do_POST(self):
        if self.path != "/generate":
            self._send(404, b"{}")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        except ValueError:
            self._send(400, b'{"error": {"message": "body is not JSON"}}')
            return
        type(self).requests.append(body)
        type(self).workers.append(self.server.server_address[1])
        if type(self).delay:
            time.sleep(type(self).delay)
        if type(self).drop:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if type(self).malformed:
            self._send(200, b"{not json")
            return
        if type(self).starting:
            self._send(503, b'{"error": {"message": "the server is starting"}}')
            return
        if type(self).fail_status:
            self._send(type(self).fail_status, json.dumps({"error": {"message": f"refused with {type(self).fail_status}"}}).encode())
            return
        try:
            if "input_ids" in body:
                if "text" in body or not isinstance(body["input_ids"], list) or not all(isinstance(t, int) for t in body["input_ids"]):
                    raise BadRequest("input_ids must be a list of token ids, and not given with text")
                batch, prompts = False, [list(body["input_ids"])]
            else:
                batch = isinstance(body.get("text"), list)
                texts = body["text"] if batch else [body["text"]]
                if not all(isinstance(t, str) for t in texts):
                    raise BadRequest("text must be a string or a list of strings")
                prompts = [[token_id(w) for w in t.split()] for t in texts]
            key = body.get("extra_key")
            if key is None or isinstance(key, str):
                namespaces = [key or ""] * len(prompts)
            elif batch and isinstance(key, list) and len(key) == len(prompts) and all(isinstance(k, str) for k in key):
                namespaces = list(key)
            else:
                raise BadRequest("extra_key must be a string, or for a batch a list of strings as long as it")
            raw = body.get("sampling_params", {})
            if isinstance(raw, list):
                if not batch or len(raw) != len(prompts):
                    raise BadRequest("sampling_params: a list needs a text list of the same length")
                params = [check_sampling(p) for p in raw]
            else:
                params = [check_sampling(raw)] * len(prompts)
        except (BadRequest, KeyError) as exc:
            message = str(exc) if isinstance(exc, BadRequest) else f"missing {exc}"
            self._send(400, json.dumps({"error": {"message": message}}).encode())
            return
        results = []
        with type(self).lock:
            for tokens, p, namespace in zip(prompts, params, namespaces, strict=True):
                cached = self._cached(namespace, tokens)
                copies = []
                for i in range(p.get("n") or 1):
                    index = len(copies) + len(results)
                    limit = p.get("max_new_tokens", 128)
                    words = (type(self).text.format(i=index) if limit else "").split(" ")
                    answer = " ".join(words[:limit]) if limit else ""
                    generated = len(answer.split()) if answer else 0
                    finish = {"type": "abort", "message": "aborted"} if type(self).abort else (
                        {"type": "length", "length": limit} if generated >= limit else {"type": "stop", "matched": 1}
                    )
                    meta = {
                        "id": f"rid_{index}",
                        "finish_reason": finish,
                        "prompt_tokens": len(tokens),
                        "completion_tokens": generated,
                        "cached_tokens": cached,
                        "e2e_latency": 0.01,
                    }
                    if body.get("return_logprob"):
                        meta["output_token_logprobs"] = type(self).logprobs or [[-0.25, 1, None]] * generated
                        if body.get("logprob_start_len") == 0:
                            meta["input_token_logprobs"] = [[None if k == 0 else -1.0, t, None] for k, t in enumerate(tokens)]
                    output_ids = [token_id(w) for w in answer.split()]
                    copies.append({"text": answer, "output_ids": output_ids, "meta_info": meta})
                type(self).seen.setdefault(self.server.server_address[1], []).append((namespace, tokens))
                results.append(copies if (p.get("n") or 1) > 1 else copies[0])
        body = json.dumps([c for r in results for c in (r if isinstance(r, list) else [r])] if batch else results[0])
        if type(self).prompt_tokens_raw is not None:
            body = re.sub(r'"prompt_tokens": \d+', f'"prompt_tokens": {type(self).prompt_tokens_raw}', body)
        self._send(200, body.encode())


class StandIn:
    """The stand-in on a loopback port; ``stop`` takes it away, ``start`` brings it back there."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "StandIn":
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), FakeSGLang)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
