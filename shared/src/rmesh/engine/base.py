"""The narrow engine interface the solver talks to.

Two real implementations: ``LlamaEngine`` (llama.cpp in process, the embedded default) and
``SGLangEngine`` (SGLang's native HTTP API). Each translates ``SamplingParams`` in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rmesh.engine.chat import ChatTemplate

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclass(frozen=True)
class KVGeometry:
    """What one token costs in the KV cache: 2 (K and V) · layers · kv_heads · head_dim · bytes."""

    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_element: int = 2  # f16 caches

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int = 0
    # Never stop at end-of-sequence: every branch generates exactly max_new_tokens (benchmarks).
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """N branches of one prompt. Branches share the prompt's prefix; it is evaluated once."""

    prompt: str
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # GBNF grammar (llama.cpp) / EBNF (SGLang's ``ebnf``) that every branch must follow.
    grammar: str | None = None
    # Absolute ``time.monotonic()`` after which the work is abandoned.
    deadline: float | None = None
    # Sum the log-probability of each generated token (MCTS priors); costs a softmax per token.
    logprobs: bool = False
    # A continuation: ``prompt`` is ``prefix`` followed by text the engine generated before, whose
    # token ids are ``continuation_ids``. An engine that knows ``prefix``'s ids sends ids, so the
    # parent's tokens are reused exactly, never re-tokenised (SGLang's ``input_ids``).
    prefix: str | None = None
    continuation_ids: tuple[int, ...] | None = None
    # Whose work this is (the tenant): an engine that batches calls shares room fairly by owner.
    owner: str = ""


@dataclass(frozen=True)
class BranchResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH | FINISH_ABORT
    logprob: float = 0.0  # sum over generated tokens, when requested
    output_ids: tuple[int, ...] = ()  # the generated tokens, where the engine reports them
    # How many tokens the model chose among alternatives (a grammar-forced token is no choice:
    # SGLang reports it as log-probability 0); None when every generated token counts.
    logprob_tokens: int | None = None


@dataclass
class EngineStats:
    jobs_started: int = 0
    jobs_finished: int = 0
    jobs_cancelled: int = 0
    tokens_generated: int = 0
    busy: bool = False
    # Continuous batching (the embedded engine): the most calls one decode step has carried, and
    # the calls decoding and waiting for room now.
    peak_calls_per_step: int = 0
    calls_decoding: int = 0
    calls_waiting: int = 0


class Engine(Protocol):
    model_name: str
    chat_template: "ChatTemplate"  # how the served model writes its turns (rmesh.engine.chat)
    stats: EngineStats

    @property
    def kv_bytes_per_token(self) -> int:
        """2 · layers · kv_heads · head_dim · bytes per element, read from the model."""

    def count_tokens(self, text: str) -> int: ...

    async def generate(self, request: GenerationRequest) -> list[BranchResult]:
        """Generate ``request.n`` branches; raise ``rmesh.errors.DeadlineExceeded`` past the deadline."""

    async def generate_many(self, requests: list[GenerationRequest]) -> list[list[BranchResult]]:
        """Several prompts, each with its branches, in one batch that shares common prefixes."""

    async def healthy(self) -> bool: ...

    async def aclose(self) -> None: ...
