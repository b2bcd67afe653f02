"""Registry of exact checkers by name."""

from rmesh.verifier_svc.checkers.arithmetic import ArithmeticChecker
from rmesh.verifier_svc.checkers.base import ExactChecker

REGISTRY: dict[str, ExactChecker] = {c.name: c for c in (ArithmeticChecker(),)}

__all__ = ["REGISTRY", "ExactChecker"]
