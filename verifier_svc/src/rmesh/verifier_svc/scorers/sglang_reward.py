"""A reward model served by SGLang (``--is-embedding``) through its ``/classify`` endpoint.

Request and response shapes follow SGLang 0.5.23 (``sglang/srt/entrypoints/http_server.py``):
the body is ``{"text": [..]}``; the response is a list with one ``{"embedding": [reward, ...],
"meta_info": {...}}`` per text, and the reward is ``embedding[0]``. Rewards are logits; the
score is their logistic, in [0, 1]. A reward model scores a conversation: the question as the
user's turn and the answer (or the steps so far) as the assistant's, written in the reward
model's own chat template (``RMESH_REWARD_CHAT_TEMPLATE``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import httpx

from rmesh.domain import Candidate
from rmesh.engine.chat import ChatTemplate, with_known_control_tokens
from rmesh.errors import Unavailable


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


class SGLangRewardModel:
    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient | None = None,
        model: str = "reward-model",
        template: ChatTemplate | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.template = with_known_control_tokens(template or ChatTemplate.named("chatml"))
        self._client = client or httpx.AsyncClient(base_url=self.base_url, timeout=60)
        self.name = f"sglang-reward:{model}"

    async def _rewards(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        try:
            response = await self._client.post("/classify", json={"text": texts})
        except httpx.HTTPError as exc:
            raise Unavailable(f"reward model at {self.base_url} unreachable: {exc}") from None
        if response.status_code != 200:
            raise Unavailable(f"reward model /classify answered {response.status_code}")
        try:
            payload = response.json()
            items = payload if isinstance(payload, list) else [payload]
            rewards = [float(item["embedding"][0]) for item in items]
        except (ValueError, KeyError, IndexError, TypeError):
            raise Unavailable("reward model /classify response lacks embedding[0]") from None
        if len(rewards) != len(texts):
            raise Unavailable(f"reward model returned {len(rewards)} rewards for {len(texts)} texts")
        return [_logistic(r) for r in rewards]

    async def outcome(self, problem: str, candidates: Sequence[Candidate]) -> list[float]:
        return await self._rewards([self._conversation(problem, c.final_answer) for c in candidates])

    def _conversation(self, problem: str, answer: str) -> str:
        return self.template.render([("user", problem.strip()), ("assistant", answer.strip())], add_generation_prompt=False)

    async def process(self, problem: str, candidates: Sequence[Candidate]) -> list[list[float]]:
        texts, owners = [], []
        for index, candidate in enumerate(candidates):
            steps = [cp.text for cp in candidate.checkpoints]
            for end in range(1, len(steps) + 1):
                texts.append(self._conversation(problem, "\n".join(steps[:end])))
                owners.append(index)
        scores: list[list[float]] = [[] for _ in candidates]
        for owner, score in zip(owners, await self._rewards(texts)):
            scores[owner].append(score)
        return scores

    async def aclose(self) -> None:
        await self._client.aclose()
