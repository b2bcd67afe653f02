"""``InstantEngine``: answers every branch at once with fixed text. For benchmarks only.

It lets ``make bench`` and the load generator measure what the mesh itself costs (auth,
policy, tracing, the verifier round trip) with no model time in the way. It is never a
default: the solver runs it only when ``RMESH_ENGINE=instant`` is set explicitly.
"""

from __future__ import annotations

import asyncio
import time

from rmesh.engine.base import FINISH_LENGTH, FINISH_STOP, BranchResult, EngineStats, GenerationRequest, KVGeometry
from rmesh.engine.chat import ChatTemplate
from rmesh.errors import DeadlineExceeded

# A response on the template that the ``arithmetic`` checker passes for "2 + 3".
DEFAULT_TEXT = (
    "<response>\n<checkpoint>2 + 3 = 5</checkpoint>\n"
    "<verification_summary>Checked the sum.</verification_summary>\n"
    "<final_answer>5</final_answer>\n</response>"
)


class InstantEngine:
    model_name = "instant-benchmark-engine"

    def __init__(
        self,
        text: str = DEFAULT_TEXT,
        delay_seconds: float = 0.0,
        kv: KVGeometry = KVGeometry(layers=1, kv_heads=1, head_dim=64),
    ) -> None:
        self.text = text or DEFAULT_TEXT
        # A fixed think time per call, so shutdown and fault tests have requests in flight.
        self.delay_seconds = delay_seconds
        self.stats = EngineStats()
        self.chat_template = ChatTemplate.named("chatml")  # its prompts are never read
        self._kv = kv
        self._completion_tokens = self.count_tokens(self.text)

    @property
    def kv_bytes_per_token(self) -> int:
        return self._kv.bytes_per_token

    def count_tokens(self, text: str) -> int:
        return len(text.encode()) // 4 + 1

    async def generate(self, request: GenerationRequest) -> list[BranchResult]:
        (results,) = await self.generate_many([request])
        return results

    async def generate_many(self, requests: list[GenerationRequest]) -> list[list[BranchResult]]:
        deadlines = [r.deadline for r in requests if r.deadline is not None]
        if deadlines and time.monotonic() + self.delay_seconds > min(deadlines):
            await asyncio.sleep(max(0.0, min(deadlines) - time.monotonic()))
            raise DeadlineExceeded("the request's deadline passed during generation")
        await asyncio.sleep(self.delay_seconds)
        self.stats.jobs_started += 1
        out = []
        for request in requests:
            prompt_tokens = self.count_tokens(request.prompt)
            limit = request.sampling.max_new_tokens
            # Over the token cap the text is cut where the cap falls, as a real engine's would be.
            text, finish = (self.text, FINISH_STOP) if self._completion_tokens <= limit else (self.text[: 4 * limit], FINISH_LENGTH)
            completion = min(self._completion_tokens, limit)
            out.append([
                BranchResult(text, prompt_tokens, completion, prompt_tokens if i else 0, finish)
                for i in range(request.n)
            ])
            self.stats.tokens_generated += completion * request.n
        self.stats.jobs_finished += 1
        return out

    async def healthy(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
