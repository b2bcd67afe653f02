"""``rmesh policy lint|test``: check tenant files the way the router will load them."""

from __future__ import annotations

import pathlib
import sys

from rmesh.router_svc.policy.engine import decide
from rmesh.router_svc.policy.loader import PolicyError, load_policy, run_test, sample_view


def _files(directory: str) -> list[pathlib.Path]:
    root = pathlib.Path(directory)
    if not root.exists():
        print(f"rmesh-router policy: {directory} does not exist (give a tenant directory or set RMESH_TENANTS_DIR)", file=sys.stderr)
        raise SystemExit(2)
    return sorted(root.glob("*.yaml")) if root.is_dir() else [root]


def lint(directory: str) -> int:
    failures = 0
    for file in _files(directory):
        try:
            policy = load_policy(file, run_tests=False)
        except PolicyError as exc:
            failures += 1
            print(f"FAIL {exc.message}")
            continue
        print(f"ok   {file}: tenant {policy.tenant}, revision {policy.revision}, {len(policy.routes)} routes")
    return 1 if failures else 0


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
