"""A generative judge on the engine: the score is the probability of "Yes" as the next token.

Outcome mode asks whether the final answer is right; process mode asks, for each checkpoint
prefix, whether its last step is right. Every prompt of a batch goes to the engine in one call,
so the judge costs one prefix evaluation for the shared question, not one per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

from rmesh.domain import Candidate
from rmesh.engine.chat import ChatTemplate

OPTIONS = ("Yes", "No")


def outcome_question(problem: str, candidate: Candidate) -> str:
    return (
        f"Question: {problem.strip()}\nProposed answer: {candidate.final_answer.strip()}\n"
        "Is the proposed answer correct? Reply Yes or No."
    )


def step_question(problem: str, steps: Sequence[str]) -> str:
    listed = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))
    return f"Question: {problem.strip()}\nSteps so far:\n{listed}\nIs the last step correct? Reply Yes or No."


def outcome_prompt(problem: str, candidate: Candidate, template: ChatTemplate) -> str:
    """The judge's question in the model's chat template, the model's turn opened for its Yes/No."""
    return template.render([("user", outcome_question(problem, candidate))])


def step_prompt(problem: str, steps: Sequence[str], template: ChatTemplate) -> str:
    return template.render([("user", step_question(problem, steps))])


class GenerativeJudge:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.name = f"generative-judge:{engine.model_name}"

    async def outcome(self, problem: str, candidates: Sequence[Candidate]) -> list[float]:
        if not candidates:
            return []
        template = self.engine.chat_template
        probabilities = await self.engine.option_probabilities([outcome_prompt(problem, c, template) for c in candidates], OPTIONS)
        return [float(p[0]) for p in probabilities]

    async def process(self, problem: str, candidates: Sequence[Candidate]) -> list[list[float]]:
        prompts, owners = [], []
        for index, candidate in enumerate(candidates):
            steps = [cp.text for cp in candidate.checkpoints]
            for end in range(1, len(steps) + 1):
                prompts.append(step_prompt(problem, steps[:end], self.engine.chat_template))
                owners.append(index)
        scores: list[list[float]] = [[] for _ in candidates]
        if prompts:
            for owner, p in zip(owners, await self.engine.option_probabilities(prompts, OPTIONS)):
                scores[owner].append(float(p[0]))
        return scores
