"""``arithmetic``: recompute ``params.expression`` exactly and compare it with the answer.

The expression is parsed with ``ast`` and evaluated over ``Fraction`` by walking only the node
types an arithmetic expression needs; nothing is ever passed to ``eval``.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rmesh.domain import CheckResult
from rmesh.errors import InvalidRequest
from rmesh.numbers import parse_number

MAX_EXPRESSION_CHARS = 1000
MAX_EXPONENT = 64
MAX_MAGNITUDE = Fraction(10) ** 60

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class ExpressionError(ValueError):
    pass


# Checks repeat their expression on every request of a task kind, and candidates repeat their
# equations across branches: the most recent results are kept (a Fraction is immutable).
EVALUATED_CACHE = 4096


@functools.lru_cache(maxsize=EVALUATED_CACHE)
def evaluate(expression: str) -> Fraction:
    """Evaluate an arithmetic expression exactly; raise ExpressionError on anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"not an arithmetic expression ({exc.msg})") from None
    return _eval_node(tree.body)


def _eval_node(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ExpressionError("number out of range")  # "1e999" parses as infinity
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval_node(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise ExpressionError(f"exponent must be an integer of at most {MAX_EXPONENT}")
            if left == 0 and right < 0:
                raise ExpressionError("division by zero")
            result = left ** int(right)
        elif type(node.op) in _BINARY:
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
                raise ExpressionError("division by zero")
            result = Fraction(_BINARY[type(node.op)](left, right))
        else:
            raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
        if abs(result) > MAX_MAGNITUDE:
            raise ExpressionError("intermediate value too large")
        return result
    raise ExpressionError(f"{type(node).__name__} is not allowed in an arithmetic expression")


@dataclass(frozen=True)
class ArithmeticChecker:
    name: str = "arithmetic"
    numeric_answer: bool = True
    expression_answer: bool = False
    blocking: bool = False

    def prepare(self, params: dict[str, Any], field_path: str) -> Fraction:
        expression = params.get("expression")
        if not isinstance(expression, str) or not expression.strip():
            raise InvalidRequest(f"{field_path}.expression", "required string is missing")
        try:
            return evaluate(expression)
        except ExpressionError as exc:
            raise InvalidRequest(f"{field_path}.expression", str(exc)) from None

    def check(self, answer: str, prepared: Fraction) -> CheckResult:
        value = parse_number(answer)
        if value is None:
            return CheckResult(self.name, False, "final answer is not a number")
        # Whole results must match exactly; others may be given as a rounded decimal.
        tolerance = 0 if prepared.denominator == 1 else Fraction(1, 10**6) * max(1, abs(prepared))
        if abs(value - prepared) <= tolerance:
            return CheckResult(self.name, True, "final answer equals the recomputed expression")
        return CheckResult(self.name, False, "final answer differs from the recomputed expression")
