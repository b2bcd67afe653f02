"""``json_schema``: the answer is a JSON document valid against ``params.schema``.

The schema itself is checked at request time (an invalid schema is INVALID_ARGUMENT), with the
draft the schema declares or, by default, 2020-12. ``$ref`` to remote documents is never fetched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema import exceptions, validators

from rmesh.domain import CheckResult
from rmesh.errors import InvalidRequest

MAX_ANSWER_CHARS = 100_000


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
        return cls(schema)

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
