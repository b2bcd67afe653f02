"""SGLang's native HTTP API (``/generate``), request and response shapes as of SGLang 0.5.23.

Every request carries one prompt (``text`` a string, ``sampling_params`` an object), the only
shape SGLang's model gateways pass through. Branches share a prefix through SGLang's radix
cache: each distinct prompt is first sent with ``max_new_tokens: 0`` so the tree holds it, then
its branches go out as one request with ``sampling_params.n``, the copies sampled apart. Cached
tokens come from ``meta_info.cached_tokens``. A continuation (a tree node's next step) goes as
``input_ids``: the prefix's ids, learned once, then the parent's generated ``output_ids``, so
the parent's tokens are reused exactly. No ``sampling_seed`` is sent: SGLang uses it only
under ``--enable-deterministic-inference``, and there all ``n`` copies of a request share it
and come out identical.

SGLang's radix cache is one tree for every caller, and ``cached_tokens`` reaches the caller: a
count earned on another tenant's prompt would say what that tenant sent. So every body carries
``extra_key``, the cache namespace SGLang (and its gateway's cache-aware routing) keys the tree
by: a digest of the request's owner (the tenant), or for work with no owner a key of its own,
fresh for each call. Reuse then stays within one tenant, as on the embedded engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from typing import Any

import httpx

from rmesh.engine.base import (
    KVGeometry,
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    BranchResult,
    EngineStats,
    GenerationRequest,
    SamplingParams,
)
from rmesh.engine.chat import ChatTemplate, with_known_control_tokens
from rmesh.errors import DeadlineExceeded, Unavailable


def sampling_to_sglang(params: SamplingParams, grammar: str | None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """The one place SamplingParams become SGLang ``sampling_params``."""
    out: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens if max_new_tokens is None else max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
    }
    if params.ignore_eos:
        out["ignore_eos"] = True
    if grammar:
        out["ebnf"] = grammar
    return out


# Continuation prefixes whose token ids are kept (one per distinct request prompt).
PREFIX_IDS_KEPT = 256


def _count(value: Any, high: int) -> int | None:
    """A count a server reported, if it is a JSON integer from 0 to ``high``; else None (a
    float, a bool, a string, a negative or an absurd number is no count)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        return None
    return value


# The largest KV pool, context and tensor-parallel degree believed from a server.
MAX_POOL_TOKENS = 1 << 34
MAX_TP = 64


def _kv_bytes_per_token(info: dict[str, Any]) -> int:
    """KV bytes one token takes across the server's tensor-parallel ranks, from
    ``internal_states[0].memory_usage``: ``kvcache`` (one rank's pool, GiB, two decimals) over
    ``token_capacity``. 0 when the server does not say, or says something impossible."""
    try:
        usage = info["internal_states"][0]["memory_usage"]
        gib = usage["kvcache"]
        tokens = _count(usage["token_capacity"], MAX_POOL_TOKENS)
        ranks = _count(info.get("tp_size", 1), MAX_TP) or 1
    except (KeyError, TypeError, IndexError):
        return 0
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not tokens or not 0 < gib < 1 << 20:
        return 0  # NaN and infinities fail the range test too
    per_token = round(gib * (1 << 30) * ranks / tokens)
    # Anything outside 1 B .. 64 MiB a token is no model's cache.
    return per_token if 0 < per_token <= 64 << 20 else 0


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _name(value: Any) -> str:
    """A model name as a server gave it, without control characters (it reaches logs and terminals)."""
    return _CONTROL.sub("", str(value))[:512]


def cache_namespace(owner: str) -> str:
    """The ``extra_key`` for an owner's work: never empty (SGLang and its gateway read an empty
    key as none, the namespace every caller shares), and no owner name in a server's logs."""
    if not owner:
        return "rmesh-call-" + secrets.token_hex(16)
    return "rmesh-" + hashlib.sha256(owner.encode()).hexdigest()[:32]


def _key(prompt: dict[str, Any]) -> tuple:
    content = ("ids", *prompt["input_ids"]) if "input_ids" in prompt else ("text", prompt["text"])
    return (prompt["extra_key"], *content)


def _finish_reason(meta: dict[str, Any]) -> str:
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else None
    return {"stop": FINISH_STOP, "length": FINISH_LENGTH}.get(kind, FINISH_ABORT)


class SGLangEngine:
    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient | None = None,
        kv: KVGeometry | None = None,
        chat_template: str = "auto",
    ) -> None:
        """``chat_template``: "auto" takes the shipped template of the family the served model's
        path names (read by ``describe``), else a shipped name or a Jinja file's path.
        ``kv``: the served model's KV layout, only to override what the server reports."""
        self.base_url = base_url.rstrip("/")
        self.kv = kv
        # KV bytes per token as the server reports them (its pool's size over its token count).
        self.reported_kv_bytes_per_token = 0
        self._client = client or httpx.AsyncClient(base_url=self.base_url, timeout=None)
        # Health and model questions on connections of their own: busy generations never
        # starve them (a pool full of long /generate calls would read as an engine down).
        self._probe = httpx.AsyncClient(base_url=self.base_url, timeout=10)
        self.model_name = "sglang"  # until describe() reads the served model's path
        self.context_length = 0
        self.kv_capacity_tokens = 0  # the server's KV pool, in tokens (max_total_num_tokens)
        self._configured_template = chat_template
        # Token ids of continuation prefixes (prompt + the response's opening) by cache
        # namespace, newest last.
        self._prefix_ids: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
        self._template = None if chat_template == "auto" else with_known_control_tokens(ChatTemplate.named(chat_template))
        self.stats = EngineStats()

    @property
    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            raise Unavailable(self.readiness_problem())
        return self._template

    def readiness_problem(self) -> str:
        """Why the engine cannot take a search yet (its chat template or its KV cost per token is
        unknown), or "" when it can."""
        if self._template is not None:
            if self.kv is None and not self.reported_kv_bytes_per_token:
                return (
                    f"SGLang at {self.base_url} has not reported its KV cache size (/server_info "
                    "internal_states memory_usage); set RMESH_SGLANG_KV_GEOMETRY to give the model's layout"
                )
            return ""
        if self.model_name == "sglang":
            return (
                f"SGLang at {self.base_url} has not said which model it serves yet (/server_info), so its chat "
                "template is unknown; set RMESH_CHAT_TEMPLATE to name it"
            )
        return (
            f"the served model {self.model_name} is of no family with a shipped chat template; set "
            "RMESH_CHAT_TEMPLATE to a shipped name or a Jinja file"
        )

    async def describe(self) -> bool:
        """Read the served model and its limits: ``/server_info`` on an SGLang server; through a
        gateway, which does not forward it, the model's name from ``/v1/models``. False when
        neither answers."""
        info = await self._get_json("/server_info")
        if not (isinstance(info, dict) and info.get("model_path")):
            info = await self._get_json("/get_server_info")  # the older path, which gateways forward
        previous = self.model_name
        if isinstance(info, dict) and info.get("model_path"):
            self.model_name = _name(info["model_path"])
            # A pool or context that is not a plausible count is no answer: 0, the configured budget.
            self.context_length = _count(info.get("context_length"), MAX_POOL_TOKENS) or 0
            self.kv_capacity_tokens = _count(info.get("max_total_num_tokens"), MAX_POOL_TOKENS) or 0
            self.reported_kv_bytes_per_token = _kv_bytes_per_token(info)
        else:
            models = await self._get_json("/v1/models")
            data = models.get("data") if isinstance(models, dict) else None
            if not (isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("id")):
                return False
            self.model_name = _name(data[0]["id"])
        if self.model_name != previous:
            self._prefix_ids.clear()  # another model tokenizes otherwise
        if self._configured_template == "auto":
            found = ChatTemplate.for_model(self.model_name)
            self._template = with_known_control_tokens(found) if found is not None else None
        return True

    async def tokens_in_use(self) -> int | None:
        """Tokens the server's KV holds now, summed over its data-parallel ranks (``/get_load``);
        None when it does not say."""
        load = await self._get_json("/get_load")
        ranks = load if isinstance(load, list) else [load] if isinstance(load, dict) else []
        try:
            counts = [int(rank["num_tokens"]) for rank in ranks]
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        return sum(counts) if counts else None

    async def _get_json(self, path: str):
        try:
            response = await self._probe.get(path, timeout=10)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def _post(self, path: str, body: dict[str, Any], deadline: float | None) -> Any:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline passed before the engine call")
        try:
            response = await asyncio.wait_for(self._client.post(path, json=body), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("engine call exceeded the deadline") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"SGLang engine at {self.base_url} unreachable: {exc}") from None
        if response.status_code != 200:
            raise Unavailable(f"SGLang {path} answered {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise Unavailable(f"SGLang {path} returned malformed JSON") from None

    @property
    def kv_bytes_per_token(self) -> int:
        if self.kv is not None:
            return self.kv.bytes_per_token
        if not self.reported_kv_bytes_per_token:
            raise Unavailable(self.readiness_problem())
        return self.reported_kv_bytes_per_token

    def count_tokens(self, text: str) -> int:
        # No tokenizer on this side of the HTTP API: a conservative estimate (about 3 bytes a
        # token for English under SentencePiece vocabularies) that errs towards more tokens.
        # A search measures its prompt with ``measure_tokens`` instead.
        return len(text.encode()) // 3 + 1

    async def measure_tokens(self, prompt: str, deadline: float | None, owner: str = "") -> int:
        """The prompt's exact token count under the served tokenizer, from a warm-up that
        generates nothing (the same one that puts the prompt in the owner's radix cache)."""
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 0}, "extra_key": cache_namespace(owner)}
        payload = await self._post("/generate", body, deadline)
        item = payload[0] if isinstance(payload, list) and payload else payload
        try:
            count = _count(item["meta_info"]["prompt_tokens"], MAX_POOL_TOKENS)
        except (KeyError, TypeError):
            count = None
        size = len(prompt.encode())
        # No tokenizer makes a token of more than 32 bytes of text, or of less than a quarter byte.
        if count is None or not max(1, size // 32) <= count <= 4 * size + 16:
            raise Unavailable(f"SGLang /generate response is malformed: {count} prompt tokens for {size} bytes of prompt")
        return count

    async def generate(self, request: GenerationRequest) -> list[BranchResult]:
        (results,) = await self.generate_many([request])
        return results

    async def generate_many(self, requests: list[GenerationRequest]) -> list[list[BranchResult]]:
        self.stats.jobs_started += 1
        deadline = min((r.deadline for r in requests if r.deadline is not None), default=None)
        # One namespace per owner; work with no owner gets one of its own for this call.
        namespaces = {owner: cache_namespace(owner) for owner in {r.owner for r in requests}}
        try:
            inputs = await self._inputs(requests, [namespaces[r.owner] for r in requests], deadline)
            # Warm the radix tree with every distinct prompt, then send each node's branches as
            # one request of n copies, all of which hit that prompt's cached prefix.
            distinct = list({_key(i): i for i in inputs}.values())
            await asyncio.gather(
                *(self._post("/generate", {**i, "sampling_params": {"max_new_tokens": 0}}, deadline) for i in distinct)
            )
            bodies = []
            for r, prompt in zip(requests, inputs, strict=True):
                params = sampling_to_sglang(r.sampling, r.grammar)
                if r.n != 1:
                    params["n"] = r.n
                body: dict[str, Any] = {**prompt, "sampling_params": params}
                if r.logprobs:
                    body["return_logprob"] = True
                bodies.append(body)
            payloads = await asyncio.gather(*(self._post("/generate", body, deadline) for body in bodies))
        except DeadlineExceeded:
            self.stats.jobs_cancelled += 1
            raise
        grouped = []
        for r, payload in zip(requests, payloads, strict=True):
            items = payload if isinstance(payload, list) else [payload]
            if len(items) != r.n:
                raise Unavailable(f"SGLang returned {len(items)} results for {r.n} branches")
            grouped.append([self._branch(item, r.sampling.max_new_tokens) for item in items])
        self.stats.jobs_finished += 1
        self.stats.tokens_generated += sum(b.completion_tokens for group in grouped for b in group)
        return grouped

    async def _inputs(
        self, requests: list[GenerationRequest], namespaces: list[str], deadline: float | None
    ) -> list[dict[str, Any]]:
        """Each request's prompt as SGLang takes it, in its cache namespace: token ids for a
        continuation whose prefix's ids are known (the parent's generated tokens are then reused
        exactly), else text. A prefix's ids are learned once per namespace, from one warm-up
        that reports its input tokens."""
        keys = [(ns, r.prefix) if r.prefix and r.continuation_ids is not None else None for r, ns in zip(requests, namespaces, strict=True)]
        unknown = list({key for key in keys if key is not None and key not in self._prefix_ids})
        if unknown:
            learned = await asyncio.gather(*(self._learn_ids(prefix, ns, deadline) for ns, prefix in unknown))
            for key, ids in zip(unknown, learned, strict=True):
                if ids:
                    self._prefix_ids[key] = ids
                    while len(self._prefix_ids) > PREFIX_IDS_KEPT:
                        self._prefix_ids.popitem(last=False)
        out = []
        for r, ns, key in zip(requests, namespaces, keys, strict=True):
            ids = self._prefix_ids.get(key) if key is not None else None
            prompt: dict[str, Any] = {"input_ids": [*ids, *r.continuation_ids]} if ids else {"text": r.prompt}
            out.append({**prompt, "extra_key": ns})
        return out

    async def _learn_ids(self, prefix: str, namespace: str, deadline: float | None) -> tuple[int, ...] | None:
        body = {
            "text": prefix, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 0,
            "extra_key": namespace,
        }
        payload = await self._post("/generate", body, deadline)
        item = payload[0] if isinstance(payload, list) and payload else payload
        try:
            entries = item["meta_info"]["input_token_logprobs"]
            return tuple(int(entry[1]) for entry in entries)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError):
            return None  # no ids from this server: continuations go as text

    @staticmethod
    def _branch(item: Any, max_new_tokens: int) -> BranchResult:
        """One branch of an answer, held to what was asked: a server that reports more tokens
        than it could have generated, or negative counts, is malformed, not trusted."""
        try:
            meta = item["meta_info"]
            logprobs = meta.get("output_token_logprobs") or []
            counts = (int(meta["prompt_tokens"]), int(meta["completion_tokens"]), int(meta.get("cached_tokens", 0)))
            ids = item.get("output_ids") or ()
            if min(counts) < 0 or counts[1] > max_new_tokens or len(ids) > max_new_tokens or len(logprobs) > max_new_tokens:
                raise ValueError("counts out of range")
            return BranchResult(
                text=str(item["text"]),
                prompt_tokens=int(meta["prompt_tokens"]),
                completion_tokens=int(meta["completion_tokens"]),
                cached_tokens=int(meta.get("cached_tokens", 0)),
                finish_reason=_finish_reason(meta),
                logprob=float(sum(entry[0] for entry in logprobs if entry and entry[0] is not None)),
                # SGLang's log-probabilities come after the grammar mask: a forced token is 0.
                logprob_tokens=sum(1 for entry in logprobs if entry and entry[0] is not None and entry[0] < 0)
                if logprobs else None,
                output_ids=tuple(int(t) for t in ids),
            )
        except (KeyError, TypeError, ValueError, IndexError, OverflowError):
            raise Unavailable(
                "SGLang /generate response is malformed: text or meta_info missing, or token counts out of range"
            ) from None

    async def healthy(self) -> bool:
        try:
            response = await self._probe.get("/health_generate", timeout=10)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._probe.aclose()
