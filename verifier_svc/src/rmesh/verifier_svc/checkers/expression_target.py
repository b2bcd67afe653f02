"""``expression_target``: the answer is an arithmetic expression over the given numbers that
equals the target — countdown and the Game of 24. Each number may be used at most as often
as it is given (``params.numbers``), and the value must equal ``params.target`` exactly. With
``params.use_all`` every number must be used exactly as often as given (reasoning-gym's
countdown asks for that)."""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rmesh.domain import CheckResult
from rmesh.errors import InvalidRequest
from rmesh.verifier_svc.checkers.arithmetic import ExpressionError, evaluate

MAX_NUMBERS = 32


@dataclass(frozen=True)
class Prepared:
    numbers: Counter
    target: Fraction
    use_all: bool = False


def _literals(expression: str) -> list[Fraction]:
    tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    return [Fraction(str(node.value)) for node in ast.walk(tree) if isinstance(node, ast.Constant)]


@dataclass(frozen=True)
class ExpressionTargetChecker:
    name: str = "expression_target"
    numeric_answer: bool = False
    expression_answer: bool = True
    blocking: bool = False

    def prepare(self, params: dict[str, Any], field_path: str) -> Prepared:
        numbers = params.get("numbers")
        if not isinstance(numbers, list) or not numbers or len(numbers) > MAX_NUMBERS:
            raise InvalidRequest(f"{field_path}.numbers", f"must be a list of 1 to {MAX_NUMBERS} numbers")
        if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
            raise InvalidRequest(f"{field_path}.numbers", "every item must be a number")
        target = params.get("target")
        if not isinstance(target, (int, float)) or isinstance(target, bool):
            raise InvalidRequest(f"{field_path}.target", "must be a number")
        use_all = params.get("use_all", False)
        if not isinstance(use_all, bool):
            raise InvalidRequest(f"{field_path}.use_all", "must be true or false")
        return Prepared(Counter(Fraction(str(n)) for n in numbers), Fraction(str(target)), use_all)

    def check(self, answer: str, prepared: Prepared) -> CheckResult:
        expression = answer.strip().rstrip(".")
        if "=" in expression:
            expression = expression.split("=")[0]
        try:
            value = evaluate(expression)
            used = Counter(_literals(expression))
        except (ExpressionError, SyntaxError, ValueError):
            return CheckResult(self.name, False, "answer is not an arithmetic expression")
        extra = used - prepared.numbers
        if extra:
            return CheckResult(self.name, False, "uses numbers not given, or more often than given")
        if prepared.use_all and used != prepared.numbers:
            return CheckResult(self.name, False, "does not use every given number")
        if value != prepared.target:
            return CheckResult(self.name, False, "expression does not equal the target")
        return CheckResult(self.name, True, "uses only the given numbers and equals the target")
