"""Reading a final answer as a number, the same way in every service.

The verifier's arithmetic checker compares the number with the recomputed expression; the
solver's self-consistency vote groups answers that are the same number written differently.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")


def parse_number(answer: str) -> Fraction | None:
    """Read the answer as one number ("42", "-3.5", "7/2", "1,234"); None when it is not one."""
    text = answer.strip().rstrip(".").replace(",", "").replace(" ", "")
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ZeroDivisionError, ValueError):  # "0/0", "7/0"
        return None


def format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6g}"
