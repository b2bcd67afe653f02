"""``json_schema``: the answer is a JSON document valid against ``params.schema``.

The schema itself is checked at request time (an invalid schema is INVALID_ARGUMENT), with the
draft the schema declares or, by default, 2020-12. ``$ref`` to remote documents is never fetched.
``pattern`` and ``patternProperties`` run on RE2 (linear time), not Python's backtracking ``re``:
a caller's schema must not be able to stall the verifier; a pattern RE2 cannot compile is refused.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import jsonschema
import re2
from jsonschema import exceptions, validators

from rmesh.domain import CheckResult
from rmesh.errors import InvalidRequest
from rmesh.verifier_svc.checkers.regex import re2_options

MAX_ANSWER_CHARS = 100_000


@functools.lru_cache(maxsize=256)
def _re2(pattern: str):
    try:
        return re2.compile(pattern, re2_options())
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"pattern {pattern[:80]!r} is not an RE2 pattern: {reason}") from None


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not _re2(pattern).search(instance):
        yield exceptions.ValidationError(f"{instance[:80]!r} does not match {pattern[:80]!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        compiled = _re2(pattern)
        for key, value in instance.items():
            if compiled.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _patterns(schema) -> list[str]:
    """Every pattern a schema holds, wherever it is nested."""
    found: list[str] = []
    if isinstance(schema, dict):
        if isinstance(schema.get("pattern"), str):
            found.append(schema["pattern"])
        if isinstance(schema.get("patternProperties"), dict):
            found += list(schema["patternProperties"])
        for value in schema.values():
            found += _patterns(value)
    elif isinstance(schema, list):
        for value in schema:
            found += _patterns(value)
    return found


@dataclass(frozen=True)
class JsonSchemaChecker:
    name: str = "json_schema"
    numeric_answer: bool = False
    expression_answer: bool = False
    blocking: bool = False

    def prepare(self, params: dict[str, Any], field_path: str):
        schema = params.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest(f"{field_path}.schema", "must be a JSON schema object")
        cls = validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except exceptions.SchemaError as exc:
            raise InvalidRequest(f"{field_path}.schema", f"not a valid JSON schema: {exc.message}") from None
        for pattern in _patterns(schema):
            try:
                _re2(pattern)
            except ValueError as exc:
                raise InvalidRequest(f"{field_path}.schema", str(exc)) from None
        linear = validators.extend(cls, {"pattern": _pattern, "patternProperties": _pattern_properties})
        return linear(schema)

    def check(self, answer: str, prepared) -> CheckResult:
        if len(answer) > MAX_ANSWER_CHARS:
            return CheckResult(self.name, False, f"answer longer than {MAX_ANSWER_CHARS} characters")
        try:
            document = json.loads(answer)
        except (ValueError, RecursionError):
            return CheckResult(self.name, False, "answer is not JSON")
        try:
            error = exceptions.best_match(prepared.iter_errors(document))
        except (exceptions.RefResolutionError, exceptions._WrappedReferencingError, RecursionError) as exc:
            return CheckResult(self.name, False, f"schema could not be applied: {type(exc).__name__}")
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return CheckResult(self.name, False, f"invalid at {where}: {error.message[:200]}")
        return CheckResult(self.name, True, "answer is valid against the schema")
