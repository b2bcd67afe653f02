"""Load a tenant file: schema, CEL compilation, identifier and type checks, route reachability,
then the file's own tests. Any failure names the file, the line and the rule; the file is refused.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jsonschema
import yaml

from rmesh.domain import Budget, SearchParams
from rmesh.errors import FailedPrecondition
from rmesh.router_svc.policy.cel import (
    CelCompileError,
    CompiledExpression,
    compile_expression,
    is_type_error,
    sample_request,
    to_activation,
    tool_arguments,
    truthy,
)
from rmesh.router_svc.policy.engine import decide, request_view
from rmesh.router_svc.policy.model import (
    UNVERIFIED,
    WITHHOLD,
    ApiKey,
    EscalationRule,
    EvidenceRule,
    Privacy,
    Quotas,
    ReviewSettings,
    Route,
    TenantPolicy,
    Tool,
)

SCHEMA_PATH = pathlib.Path(__file__).resolve().parent / "tenant.schema.json"


class PolicyError(FailedPrecondition):
    def __init__(self, file: str, line: int, rule: str, reason: str) -> None:
        super().__init__(f"{file}:{line}: {rule}: {reason}")
        self.file, self.line, self.rule, self.reason = file, line, rule, reason


def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _line_map(text: str) -> dict[tuple, int]:
    """Path (tuple of keys and indexes) -> 1-based line, from PyYAML's node marks."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, path + (key.value,))
                lines[path + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, path + (index,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _line(lines: dict[tuple, int], path: tuple) -> int:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 1)


def load_policy(path: str | pathlib.Path, run_tests: bool = True) -> TenantPolicy:
    file = pathlib.Path(path)
    text = file.read_text()
    return parse_policy(text, str(file), run_tests)


def parse_policy(text: str, source: str, run_tests: bool = True) -> TenantPolicy:
    try:
        doc = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PolicyError(source, (mark.line + 1) if mark else 1, "yaml", str(exc).splitlines()[0]) from None
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        path = tuple(error.absolute_path)
        rule = _rule_name(doc, path)
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
        hint = " (write credential: {secret: NAME}, a file the operator puts in the tenant's tool secrets directory)" if "credential" in path else ""
        raise PolicyError(source, _line(lines, path), rule, f"schema: {where + ': ' if where else ''}{error.message}{hint}")

    def fail(path: tuple, rule: str, reason: str) -> PolicyError:
        return PolicyError(source, _line(lines, path), rule, reason)

    def compile_at(path: tuple, rule: str, expression: str, known: list[str]) -> CompiledExpression:
        try:
            return compile_expression(expression, known)
        except CelCompileError as exc:
            raise fail(path, rule, str(exc)) from None

    variables: dict[str, CompiledExpression] = {}
    for i, item in enumerate(doc.get("variables", [])):
        if item["name"] in variables:
            raise fail(("variables", i, "name"), f"variable {item['name']}", "duplicate variable name")
        variables[item["name"]] = compile_at(("variables", i, "expression"), f"variable {item['name']}", item["expression"], list(variables))
    known = list(variables)

    routes: list[Route] = []
    names: set[str] = set()
    for i, item in enumerate(doc["routes"]):
        rule = f"route {item['name']}"
        if item["name"] in names:
            raise fail(("routes", i, "name"), rule, "duplicate route name")
        names.add(item["name"])
        if routes and routes[-1].when is None:
            raise fail(("routes", i), rule, f"unreachable: it follows the catch-all route {routes[-1].name!r}")
        when = compile_at(("routes", i, "when"), rule, item["when"], known) if "when" in item else None
        budget_doc = dict(item["budget"])
        max_cost = budget_doc.pop("max_cost", None)
        worth = budget_doc.pop("max_tokens_per_success", 0)
        routes.append(
            Route(
                name=item["name"],
                when=when,
                difficulty=item["difficulty"],
                strategies=tuple(item["strategies"]),
                budget=Budget(**budget_doc),
                search=SearchParams(**item.get("search", {})),
                max_cost=max_cost,
                max_tokens_per_success=worth,
                min_assurance=item.get("min_assurance", UNVERIFIED),
                below_min_assurance=item.get("below_min_assurance", WITHHOLD),
                high_impact=bool(item.get("high_impact", False)),
            )
        )
    if routes[-1].when is not None:
        raise fail(("routes", len(routes) - 1), f"route {routes[-1].name}", "the last route must have no 'when' (a catch-all)")

    evidence = []
    for i, item in enumerate(doc.get("evidence", [])):
        rule = f"evidence {item['name']}"
        evidence.append(EvidenceRule(item["name"], compile_at(("evidence", i, "when"), rule, item["when"], known), tuple(item["require"])))
    escalate = []
    for i, item in enumerate(doc.get("escalate", [])):
        rule = f"escalate {item['name']}"
        escalate.append(
            EscalationRule(
                item["name"], compile_at(("escalate", i, "when"), rule, item["when"], known), item["reason"],
                bool(item.get("high_impact", False)),
            )
        )

    tools: list[Tool] = []
    for i, item in enumerate(doc.get("tools", [])):
        rule = f"tool {item['name']}"
        if any(t.name == item["name"] for t in tools):
            raise fail(("tools", i, "name"), rule, "duplicate tool name")
        tools.append(Tool(
            name=item["name"],
            provides=tuple(item["provides"]),
            endpoint=item["endpoint"],
            arguments=compile_at(("tools", i, "arguments"), rule, item["arguments"], known),
            timeout_seconds=float(item.get("timeout_seconds", 2.0)),
            max_calls=int(item.get("max_calls", 1)),
            cache_ttl_seconds=float(item.get("cache_ttl_seconds", 0.0)),
            credential=item.get("credential", {}).get("secret", ""),
        ))

    # Type probe: evaluate every expression once on a typical request; type errors fail the load.
    probe = {**sample_request(), "tenant": doc["tenant"]}
    probes: list[tuple[tuple, str, CompiledExpression, bool]] = [
        (("variables", i, "expression"), f"variable {name}", expr, False) for i, (name, expr) in enumerate(variables.items())
    ]
    probes += [(("routes", i, "when"), f"route {r.name}", r.when, True) for i, r in enumerate(routes) if r.when]
    probes += [(("evidence", i, "when"), f"evidence {r.name}", r.when, True) for i, r in enumerate(evidence)]
    probes += [(("escalate", i, "when"), f"escalate {r.name}", r.when, True) for i, r in enumerate(escalate)]
    values: dict[str, Any] = {}
    for path, rule, expression, boolean in probes:
        try:
            value = expression.evaluate(to_activation(probe, {n: values[n] for n in expression.variables if n in values}))
            if boolean:
                truthy(value, rule)
            elif rule.startswith("variable "):
                values[rule.removeprefix("variable ")] = value
        except TypeError as exc:
            raise fail(path, rule, f"type error: {exc}") from None
        except Exception as exc:
            if is_type_error(exc):
                raise fail(path, rule, f"type error: {str(exc).splitlines()[0][:200]}") from None
    # A tool's arguments are probed on a request that has every evidence key they read: then
    # anything but a map of strings is the expression's fault, whatever the error.
    for i, tool in enumerate(tools):
        read = sorted(tool.evidence_read)
        sample = {**probe, "evidence": {**probe["evidence"], **{key: "sample" for key in read}}}
        sample["evidence_keys"] = sorted(sample["evidence"])
        try:
            value = tool.arguments.evaluate(to_activation(sample, {n: values[n] for n in tool.arguments.variables if n in values}))
            tool_arguments(value, "")
        except Exception as exc:
            raise fail(("tools", i, "arguments"), f"tool {tool.name}", f"arguments must build a map of strings: {str(exc).lstrip(': ').splitlines()[0][:200]}") from None
        scheme, _, rest = tool.endpoint.partition("://")
        if scheme in ("grpc", "grpcs"):
            host, _, port = rest.rpartition(":")
            if not host or "/" in rest or not port.isdigit() or not 0 < int(port) < 65536:
                raise fail(("tools", i, "endpoint"), f"tool {tool.name}", f"a {scheme} endpoint is {scheme}://HOST:PORT (a port from 1 to 65535, no path)")

    quotas = Quotas(**doc.get("quotas", {}))
    review = ReviewSettings(**doc.get("review", {}))
    if review.on_timeout == "approve":
        # An unanswered review must not release a high-impact draft nobody looked at.
        high = [f"route {r.name}" for r in routes if r.high_impact] + [f"escalate {r.name}" for r in escalate if r.high_impact]
        if high:
            raise fail(("review", "on_timeout"), "review.on_timeout", f"approve is not allowed: {', '.join(high)} is marked high_impact")
    privacy_doc = doc.get("privacy", {})
    privacy = Privacy(bool(privacy_doc.get("trace_content", False)), tuple(privacy_doc.get("sensitive_evidence", ())))
    policy = TenantPolicy(
        tenant=doc["tenant"],
        revision=hashlib.sha256(text.encode()).hexdigest()[:12],
        source=source,
        keys=tuple(ApiKey(k["name"], k["sha256"], k.get("role", "caller")) for k in doc["api_keys"]),
        variables=variables,
        routes=tuple(routes),
        evidence=tuple(evidence),
        escalate=tuple(escalate),
        on_error=dict(doc.get("on_error", {})),
        quotas=quotas,
        review=review,
        privacy=privacy,
        price_per_1k_completion=float(doc.get("pricing", {}).get("per_1k_completion_tokens", 0.0)),
        tests=tuple(doc.get("tests", [])),
        allow_python_tests=bool(doc.get("allow_python_tests", False)),
        tools=tuple(tools),
    )
    for i, test in enumerate(policy.tests if run_tests else ()):
        failure = run_test(policy, test)
        if failure:
            raise fail(("tests", i), f"test {test['name']}", failure)
    return policy


def _rule_name(doc: Any, path: tuple) -> str:
    if isinstance(doc, dict) and len(path) >= 2 and isinstance(path[1], int):
        section = doc.get(path[0])
        if isinstance(section, list) and path[1] < len(section) and isinstance(section[path[1]], dict):
            return f"{path[0]} {section[path[1]].get('name', path[1])}"
    return ".".join(str(p) for p in path) or "file"


def sample_view(policy_tenant: str, request: dict) -> dict:
    task = request.get("task", {}) or {}
    return request_view(
        problem=str(request.get("problem", "")),
        kind=str(task.get("kind", "")),
        checks=list(task.get("checks", [])),
        evidence={str(k): str(v) for k, v in (request.get("evidence", {}) or {}).items()},
        high_impact=bool(request.get("high_impact", False)),
        tenant=policy_tenant,
    )


def tools_to_call(policy: TenantPolicy, required, present) -> list[str]:
    """The tools a request missing ``required`` keys beyond ``present`` gets them from: each
    missing key's first provider, in the policy's order."""
    missing = [key for key in required if key not in set(present)]
    return [t.name for t in policy.tools if any(next((u for u in policy.tools if key in u.provides), None) is t for key in missing)]


def run_test(policy: TenantPolicy, test: dict) -> str | None:
    """None when the test's expectations hold, else what differed."""
    decision = decide(policy, sample_view(policy.tenant, test["request"]))
    expect = test["expect"]
    got = {
        "route": decision.route,
        "strategy": decision.strategy,
        "required_evidence": sorted(decision.required_evidence),
        "escalate": decision.escalate,
        "min_assurance": decision.min_assurance,
        "high_impact": decision.high_impact,
        "tools": tools_to_call(policy, decision.required_evidence, (test["request"].get("evidence") or {}).keys()),
    }
    wanted = {k: (sorted(v) if k == "required_evidence" else v) for k, v in expect.items()}
    diffs = [f"{k}: expected {wanted[k]!r}, got {got[k]!r}" for k in wanted if got[k] != wanted[k]]
    return "; ".join(diffs) or None
