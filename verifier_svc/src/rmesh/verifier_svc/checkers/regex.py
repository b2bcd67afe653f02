"""``regex``: the whole answer matches ``params.pattern``.

Patterns run on RE2 (google-re2), which matches in linear time: a pattern that would backtrack
catastrophically under Python's ``re`` cannot stall the verifier. Back-references and
look-around, which need backtracking, are rejected as INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import re2

from rmesh.domain import CheckResult
from rmesh.errors import InvalidRequest

MAX_PATTERN_CHARS = 2000
MAX_ANSWER_CHARS = 100_000


def re2_options() -> re2.Options:
    """Quiet (errors are reported, not logged) and memory-bounded RE2 compilation."""
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 8 << 20
    return options


@dataclass(frozen=True)
class RegexChecker:
    name: str = "regex"
    numeric_answer: bool = False
    expression_answer: bool = False
    blocking: bool = False

    def prepare(self, params: dict[str, Any], field_path: str):
        pattern = params.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequest(f"{field_path}.pattern", "must be a non-empty string")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise InvalidRequest(f"{field_path}.pattern", f"longer than {MAX_PATTERN_CHARS} characters")
        try:
            return re2.compile(pattern, re2_options())
        except re2.error as exc:
            reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            raise InvalidRequest(f"{field_path}.pattern", f"not an RE2 pattern: {reason}") from None

    def check(self, answer: str, prepared) -> CheckResult:
        if len(answer) > MAX_ANSWER_CHARS:
            return CheckResult(self.name, False, f"answer longer than {MAX_ANSWER_CHARS} characters")
        if prepared.fullmatch(answer):
            return CheckResult(self.name, True, "answer matches the pattern")
        return CheckResult(self.name, False, "answer does not match the pattern")
