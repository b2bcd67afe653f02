"""The exact-checker interface. Exact checkers are authoritative: they outrank any score."""

from __future__ import annotations

from typing import Any, Protocol

from rmesh.domain import CheckResult


class ExactChecker(Protocol):
    name: str
    # True when the answer must be a number, so the solver can constrain decoding to one.
    numeric_answer: bool
    # True when the answer must be an arithmetic expression.
    expression_answer: bool
    # True when a check blocks for long (a sandboxed process): the verifier runs such checks in
    # a worker thread and everything else on its event loop, where a thread hop would cost more
    # than the check.
    blocking: bool

    def prepare(self, params: dict[str, Any], field_path: str) -> Any:
        """Validate params once; raise InvalidRequest naming ``field_path`` + key on bad input."""

    def check(self, answer: str, prepared: Any) -> CheckResult:
        """Judge one final answer against the prepared params."""
