"""Engines: one interface, two real implementations. Heavy imports stay lazy."""

from __future__ import annotations

from rmesh.engine.base import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    BranchResult,
    Engine,
    EngineStats,
    GenerationRequest,
    KVGeometry,
    SamplingParams,
)


def create_engine(config) -> Engine:
    """Build the engine named by a ``SolverConfig``."""
    if config.engine == "embedded":
        from rmesh.engine.llama import LlamaEngine

        return LlamaEngine.load(
            model_path=config.model_path or None,
            n_ctx=config.n_ctx,
            max_branches=config.max_parallel_branches,
            threads=config.threads or None,
        )
    if config.engine == "sglang":
        from rmesh.engine.sglang import SGLangEngine

        return SGLangEngine(config.sglang_url, kv=config.sglang_kv)
    if config.engine == "instant":
        from rmesh.engine.instant import InstantEngine

        return InstantEngine(config.instant_text, config.instant_delay_seconds)
    raise ValueError(f"RMESH_ENGINE: unknown engine {config.engine!r}; known: embedded, sglang, instant (benchmarks only)")


__all__ = [
    "FINISH_ABORT",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "BranchResult",
    "Engine",
    "EngineStats",
    "GenerationRequest",
    "KVGeometry",
    "SamplingParams",
    "create_engine",
]
