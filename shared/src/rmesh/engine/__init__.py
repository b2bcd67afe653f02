"""Engines: one interface, two real implementations. Heavy imports stay lazy."""

from __future__ import annotations

import os

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
from rmesh.errors import ConfigError


def create_engine(config) -> Engine:
    """Build the engine named by a ``SolverConfig``."""
    if config.engine == "embedded":
        try:
            from rmesh.engine.llama import LlamaEngine
        except ImportError as exc:
            raise ConfigError(
                f"RMESH_ENGINE=embedded needs llama-cpp-python ({exc.name} is not installed): "
                "install the solver with its 'embedded' extra, or set RMESH_ENGINE=sglang"
            ) from None
        if config.model_path and not os.path.isfile(config.model_path):
            raise ConfigError(f"RMESH_MODEL_PATH={config.model_path}: no such model file")
        return LlamaEngine.load(
            model_path=config.model_path or None,
            n_ctx=config.n_ctx,
            max_branches=config.max_parallel_branches,
            threads=config.threads or None,
            chat_template=config.chat_template,
        )
    if config.engine == "sglang":
        from rmesh.engine.sglang import SGLangEngine

        return SGLangEngine(config.sglang_url, kv=config.sglang_kv, chat_template=config.chat_template)
    if config.engine == "instant":
        from rmesh.engine.instant import InstantEngine

        return InstantEngine(config.instant_text, config.instant_delay_seconds)
    raise ConfigError(f"RMESH_ENGINE: unknown engine {config.engine!r}; known: embedded, sglang, instant (benchmarks only)")


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
