"""The verifier service: exact checks, the evidence contract and learned scores."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import Mapping

from grpc_health.v1 import health_pb2
from opentelemetry.sdk.trace import TracerProvider

from rmesh.config import Addresses, ServerSettings, SolverConfig, VerifierConfig
from rmesh.engine import Engine, create_engine
from rmesh.engine.chat import ChatTemplate
from rmesh.errors import ConfigError
from rmesh.serving import RunningService, provider_factory, start_server
from rmesh.verifier_svc import sandbox
from rmesh.verifier_svc import servicer as verifier_servicer
from rmesh.verifier_svc.checkers import REGISTRY
from rmesh.verifier_svc.core import VerifierCore
from rmesh.verifier_svc.scorers import GenerativeJudge, SGLangRewardModel, load_calibration

# The judge's calibration that ships with the verifier (written by `rmesh verifier calibrate`).
log = logging.getLogger("rmesh.verifier")
# Health entry that reports whether the python_tests sandbox can run on this verifier.
SANDBOX_HEALTH = "rmesh.sandbox"
SHIPPED_CALIBRATION = pathlib.Path(__file__).resolve().parent / "calibration" / "judge.json"


def build_scorer(config: VerifierConfig, engine: Engine | None):
    """The learned scorer the configuration names, with its calibration if one exists.

    Returns (scorer, calibration, engine it started or None)."""
    if config.judge == "off":
        return None, None, None
    started = None
    if config.judge == "embedded":
        if engine is None:
            engine = started = create_engine(SolverConfig(engine="embedded"))
        scorer = GenerativeJudge(engine)
    else:
        scorer = SGLangRewardModel(config.reward_url, template=ChatTemplate.named(config.reward_chat_template))
    path = config.calibration_path or SHIPPED_CALIBRATION
    if config.calibration_path and not pathlib.Path(path).is_file():
        raise ConfigError(f"RMESH_JUDGE_CALIBRATION={path}: no such file")
    try:
        calibration = load_calibration(path, scorer.name)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"RMESH_JUDGE_CALIBRATION={path}: not a calibration file ({type(exc).__name__}: {exc})") from None
    return scorer, calibration, started


async def start_verifier(
    address: str,
    settings: ServerSettings,
    provider: TracerProvider,
    scorer=None,
    calibration=None,
    config: VerifierConfig = VerifierConfig(),
) -> RunningService:
    """The verifier; ``config`` says whether it offers python_tests and how many sandboxes run at
    once. Where the sandbox cannot run, the SANDBOX_HEALTH entry is NOT_SERVING and every
    python_tests check fails closed, saying why."""
    registry = {name: checker for name, checker in REGISTRY.items() if config.python_tests == "on" or name != "python_tests"}
    sandbox.set_concurrency(config.sandbox_concurrency)
    core = VerifierCore(registry=registry, scorer=scorer, calibration=calibration)
    servicer = verifier_servicer.VerifierServicer(core)
    service = await start_server(
        "verifier", address, settings, provider, lambda server: verifier_servicer.add_to_server(servicer, server),
        inner=True,
    )
    service.core = core
    if "python_tests" in registry:
        problem = await asyncio.to_thread(sandbox.probe)
        if problem:
            log.warning("python_tests checks will fail closed: %s", problem)
        await service.health.set(
            SANDBOX_HEALTH,
            health_pb2.HealthCheckResponse.NOT_SERVING if problem else health_pb2.HealthCheckResponse.SERVING,
        )
    return service


async def start(env: Mapping[str, str]) -> list[RunningService]:
    """The verifier alone; with RMESH_JUDGE=embedded it loads its own copy of the model."""
    config = VerifierConfig.load(env)
    scorer, calibration, engine = build_scorer(config, None)
    service = await start_verifier(
        Addresses.load(env).verifier, ServerSettings.load(env), provider_factory(env)("verifier"), scorer, calibration, config
    )
    service.engine = engine
    return [service]
