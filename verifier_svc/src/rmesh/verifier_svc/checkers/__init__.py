"""Registry of exact checkers by name. Exact checkers are authoritative: they outrank any score."""

from rmesh.verifier_svc.checkers.arithmetic import ArithmeticChecker
from rmesh.verifier_svc.checkers.base import ExactChecker
from rmesh.verifier_svc.checkers.expression_target import ExpressionTargetChecker
from rmesh.verifier_svc.checkers.json_schema import JsonSchemaChecker
from rmesh.verifier_svc.checkers.python_tests import PythonTestsChecker
from rmesh.verifier_svc.checkers.regex import RegexChecker
from rmesh.verifier_svc.checkers.route_constraints import RouteConstraintsChecker

REGISTRY: dict[str, ExactChecker] = {
    c.name: c
    for c in (
        ArithmeticChecker(),
        ExpressionTargetChecker(),
        JsonSchemaChecker(),
        RegexChecker(),
        RouteConstraintsChecker(),
        PythonTestsChecker(),
    )
}

__all__ = ["REGISTRY", "ExactChecker"]
