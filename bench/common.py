"""Shared pieces of the benchmarks: the in-process verifier, output files, machine facts."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time

from opentelemetry import trace

from rmesh.mesh.in_process import InProcessVerifier
from rmesh.verifier_svc.core import VerifierCore

OUT = pathlib.Path(__file__).resolve().parent / "out"


def local_verifier() -> InProcessVerifier:
    """The real verifier core called in process: benchmarks measure the search, not the network."""
    return InProcessVerifier(VerifierCore(), trace.get_tracer("rmesh.bench"))


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
