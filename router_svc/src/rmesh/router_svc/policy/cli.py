"""``rmesh policy lint|test``: check tenant files the way the router will load them."""

from __future__ import annotations

import pathlib
import re
import sys
from collections.abc import Callable

from rmesh.capacity import route_warnings
from rmesh.config import EMBEDDED_N_CTX
from rmesh.router_svc.policy.engine import decide
from rmesh.router_svc.policy.loader import PolicyError, load_policy, run_test, sample_view


def _files(directory: str) -> list[pathlib.Path]:
    root = pathlib.Path(directory)
    if not root.exists():
        print(f"rmesh-router policy: {directory} does not exist (give a tenant directory or set RMESH_TENANTS_DIR)", file=sys.stderr)
        raise SystemExit(2)
    return sorted(root.glob("*.yaml")) if root.is_dir() else [root]


SandboxProbe = Callable[[], str]


# The engine a file is linted against unless told otherwise: the embedded default (Gemma 3
# 270M, RMESH_N_CTX 16384, an f16 cache).
DEFAULT_ENGINE_TOKENS = EMBEDDED_N_CTX
DEFAULT_KV_BYTES_PER_TOKEN = 18_432


def lint(
    directory: str,
    sandbox: SandboxProbe | None = None,
    engine_tokens: int = DEFAULT_ENGINE_TOKENS,
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN,
) -> int:
    """Check every file; with ``sandbox`` (which returns why the python_tests sandbox cannot
    run, or ""), a file that allows python_tests fails where the sandbox is unavailable. A route
    whose ladder cannot run as written on an engine of ``engine_tokens`` KV tokens is a warning
    (``WARN file:line: routes.NAME: ...``); warnings do not fail the lint."""
    failures = 0
    problem: str | None = None
    for file in _files(directory):
        try:
            policy = load_policy(file, run_tests=False)
        except PolicyError as exc:
            failures += 1
            print(f"FAIL {exc.message}")
            continue
        note = ""
        if policy.allow_python_tests:
            if sandbox is None:
                note = "; allow_python_tests not checked against a sandbox (give --verifier ADDR)"
            else:
                problem = sandbox() if problem is None else problem
                if problem:
                    failures += 1
                    line = _line_of(file, "allow_python_tests")
                    print(f"FAIL {file}:{line}: allow_python_tests: the python_tests sandbox is unavailable: {problem}")
                    continue
                note = "; python_tests sandbox available"
        for route in policy.routes:
            for warning in route_warnings(
                route.strategies, route.budget, route.search, engine_tokens=engine_tokens, bytes_per_token=kv_bytes_per_token
            ):
                print(f"WARN {file}:{_route_line(file, route.name)}: routes.{route.name}: {warning}")
        required = {key for rule in policy.evidence for key in rule.require}
        for tool in policy.tools:
            unused = [key for key in tool.provides if key not in required]
            if unused:
                print(
                    f"WARN {file}:{_route_line(file, tool.name, 'tools')}: tools.{tool.name}: provides "
                    f"{', '.join(unused)}, which no evidence rule requires: it is never called for {'them' if len(unused) > 1 else 'it'}"
                )
        print(f"ok   {file}: tenant {policy.tenant}, revision {policy.revision}, {len(policy.routes)} routes{note}")
    return 1 if failures else 0


def _route_line(file: pathlib.Path, name: str, section: str = "routes") -> int:
    """The line of an entry's ``- name:`` under ``section:`` (a route's, by default)."""
    in_routes = False
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if line.startswith(f"{section}:"):
            in_routes = True
        elif in_routes and line[:1].isalpha():
            break
        elif in_routes and re.match(rf"\s*-\s*(\{{\s*)?name:\s*['\"]?{re.escape(name)}['\"]?\s*[,}}]?\s*$", line):
            return number
    return _line_of(file, section)


def _line_of(file: pathlib.Path, key: str) -> int:
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if line.startswith(f"{key}:"):
            return number
    return 1


def verifier_sandbox(address: str) -> SandboxProbe:
    """Ask a running verifier whether its sandbox works (its ``rmesh.sandbox`` health entry)."""

    def probe() -> str:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="rmesh.sandbox"), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return f"the verifier at {address} does not offer python_tests (RMESH_PYTHON_TESTS=off)"
                return f"the verifier at {address} did not answer ({exc.code().name})"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"the verifier at {address} reports its sandbox NOT_SERVING"
        return ""

    return probe


def test(directory: str) -> int:
    """Table-driven: each sample's decision, which rules matched, and rule coverage."""
    failures = 0
    for file in _files(directory):
        try:
            policy = load_policy(file, run_tests=False)
        except PolicyError as exc:
            failures += 1
            print(f"FAIL {exc.message}")
            continue
        rules = [f"route {r.name}" for r in policy.routes]
        rules += [f"evidence {r.name}" for r in policy.evidence] + [f"escalate {r.name}" for r in policy.escalate]
        covered: set[str] = set()
        print(f"{file} (tenant {policy.tenant}, revision {policy.revision})")
        for case in policy.tests:
            decision = decide(policy, sample_view(policy.tenant, case["request"]))
            kinds = {r.name: "route" for r in policy.routes} | {r.name: "evidence" for r in policy.evidence}
            kinds |= {r.name: "escalate" for r in policy.escalate}
            covered |= {f"{kinds[m]} {m}" for m in decision.matched}
            failure = run_test(policy, case)
            failures += bool(failure)
            status = "FAIL" if failure else "ok  "
            print(f"  {status} {case['name']}: matched {', '.join(decision.matched)}" + (f" -- {failure}" if failure else ""))
        missed = [r for r in rules if r not in covered]
        print(f"  coverage {len(covered)}/{len(rules)} rules" + (f"; never matched: {', '.join(missed)}" if missed else ""))
    return 1 if failures else 0
