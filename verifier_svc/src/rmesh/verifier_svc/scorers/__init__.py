"""Learned scorers: proxies that rank candidates. Exact checkers always outrank them."""

from rmesh.verifier_svc.scorers.aggregate import AGGREGATIONS, aggregate
from rmesh.verifier_svc.scorers.base import Calibration, Scorer, load_calibration
from rmesh.verifier_svc.scorers.judge import GenerativeJudge
from rmesh.verifier_svc.scorers.sglang_reward import SGLangRewardModel

__all__ = [
    "AGGREGATIONS",
    "Calibration",
    "GenerativeJudge",
    "SGLangRewardModel",
    "Scorer",
    "aggregate",
    "load_calibration",
]
