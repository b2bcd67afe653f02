"""The scorer interface and its calibration file."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from rmesh.domain import Candidate


class Scorer(Protocol):
    name: str

    async def outcome(self, problem: str, candidates: Sequence[Candidate]) -> list[float]:
        """One score in [0, 1] per candidate, in one batched call."""

    async def process(self, problem: str, candidates: Sequence[Candidate]) -> list[list[float]]:
        """Scores of every checkpoint prefix of every candidate, in one batched call."""


@dataclass(frozen=True)
class Calibration:
    """A release threshold fitted on held-out labelled candidates, with where it came from."""

    scorer: str
    threshold: float
    max_n: int
    auroc: float
    ece: float
    source: dict


def load_calibration(path: str | pathlib.Path, scorer: str) -> Calibration | None:
    """The calibration for ``scorer``, or None: an uncalibrated threshold never ships."""
    file = pathlib.Path(path)
    if not file.is_file():
        return None
    doc = json.loads(file.read_text())
    if doc.get("scorer") != scorer:
        return None
    return Calibration(
        scorer=doc["scorer"],
        threshold=float(doc["threshold"]),
        max_n=int(doc["max_n"]),
        auroc=float(doc["auroc"]),
        ece=float(doc["ece"]),
        source=dict(doc.get("source", {})),
    )
