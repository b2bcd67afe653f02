"""Shared pieces of the benchmarks: the in-process verifier, output files, machine facts."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from collections.abc import Mapping, Sequence

from rmesh.domain import Candidate, Precheck, TaskSpec, Verdict
from rmesh.verifier_svc.core import VerifierCore

OUT = pathlib.Path(__file__).resolve().parent / "out"


class LocalVerifier:
    """The real verifier core called in process: benchmarks measure the search, not the network."""

    def __init__(self) -> None:
        self.core = VerifierCore()

    async def precheck(self, task: TaskSpec, evidence: Mapping[str, str], required: Sequence[str]) -> Precheck:
        return self.core.precheck(task, evidence, required)

    async def verify(
        self,
        task: TaskSpec,
        evidence: Mapping[str, str],
        required: Sequence[str],
        candidates: Sequence[Candidate],
        **learned,
    ) -> list[Verdict]:
        verdicts, _ = await self.core.verify_scored(task, evidence, required, candidates, **learned)
        return verdicts


async def no_progress(_progress) -> None:
    return None


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write(name: str, payload: dict) -> pathlib.Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return path
