"""``python_tests``: the answer is Python code; ``params.tests`` (Python source, typically
``assert`` statements) runs against it in the sandbox. A pass needs the tests to finish cleanly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rmesh.domain import CheckResult
from rmesh.errors import InvalidRequest
from rmesh.verifier_svc.sandbox import run_python_tests

MAX_SOURCE_CHARS = 100_000


def strip_fence(answer: str) -> str:
    text = answer.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text


@dataclass(frozen=True)
class PythonTestsChecker:
    name: str = "python_tests"
    numeric_answer: bool = False
    expression_answer: bool = False
    blocking: bool = True
    sandboxed: bool = True  # runs caller code: counted against the per-call sandbox bound

    def prepare(self, params: dict[str, Any], field_path: str) -> str:
        tests = params.get("tests")
        if not isinstance(tests, str) or not tests.strip():
            raise InvalidRequest(f"{field_path}.tests", "must be Python source")
        if len(tests) > MAX_SOURCE_CHARS:
            raise InvalidRequest(f"{field_path}.tests", f"longer than {MAX_SOURCE_CHARS} characters")
        try:
            compile(tests, "tests.py", "exec")
        except SyntaxError as exc:
            raise InvalidRequest(f"{field_path}.tests", f"not valid Python: {exc.msg} (line {exc.lineno})") from None
        except (ValueError, MemoryError, RecursionError, OverflowError) as exc:
            # Deep nesting or huge literals exhaust the compiler, not the verifier.
            raise InvalidRequest(f"{field_path}.tests", f"not valid Python: the compiler gave up ({type(exc).__name__})") from None
        return tests

    def check(self, answer: str, prepared: str) -> CheckResult:
        code = strip_fence(answer)
        if len(code) > MAX_SOURCE_CHARS:
            return CheckResult(self.name, False, f"code longer than {MAX_SOURCE_CHARS} characters")
        outcome = run_python_tests(code, prepared)
        return CheckResult(self.name, outcome.passed, outcome.reason)
