"""Policy benchmark: decision latency for a tenant with 10 rules, and reload time for 20 tenant
files. Writes bench/out/policy.json."""

from __future__ import annotations

import hashlib
import pathlib
import statistics
import tempfile
import time

from bench.common import machine, write
from rmesh.router_svc.policy.engine import decide
from rmesh.router_svc.policy.loader import parse_policy, sample_view
from rmesh.router_svc.policy.store import PolicyStore

KEY = hashlib.sha256(b"bench").hexdigest()


def ten_rule_tenant(name: str) -> str:
    """4 routes (one catch-all), 3 evidence rules, 2 escalation rules and 1 variable."""
    return f"""\
tenant: {name}
api_keys:
  - {{name: caller, sha256: {hashlib.sha256(name.encode()).hexdigest()}}}
variables:
  - name: delivery
    expression: request.problem.matches("(?i)arriv|deliver|tracking")
routes:
  - name: maths
    when: request.task.kind == "arithmetic" && size(request.task.checks) > 0
    difficulty: medium
    strategies: [best_of_n]
    budget: {{max_tokens: 1200, max_branches: 8}}
  - name: long
    when: request.problem_chars > 400
    difficulty: hard
    strategies: [beam]
    budget: {{max_tokens: 4000, max_branches: 32, max_depth: 6}}
  - name: ticket
    when: size(request.evidence_keys) >= 2
    difficulty: easy
    strategies: [best_of_n]
    budget: {{max_tokens: 800, max_branches: 4}}
  - name: default
    difficulty: trivial
    strategies: [single_pass]
    budget: {{max_tokens: 200, max_branches: 1}}
evidence:
  - name: delivery
    when: variables.delivery
    require: [order, carrier]
  - name: refund
    when: request.problem.contains("refund")
    require: [order, payment]
  - name: returns
    when: '"return_policy" in request.evidence'
    require: [return_policy]
escalate:
  - name: high-impact
    when: request.high_impact && size(request.task.checks) == 0
    reason: high impact, unverifiable
  - name: big-refund
    when: '"refund_amount" in request.evidence && double(request.evidence["refund_amount"]) > 200.0'
    reason: large refund
"""


def main() -> None:
    policy = parse_policy(ten_rule_tenant("bench"), "bench.yaml")
    view = sample_view(
        "bench",
        {"problem": "My laptop has not arrived; can I get a refund?", "evidence": {"order": "1", "carrier": "hub", "return_policy": "30 days"}},
    )
    for _ in range(50):
        decide(policy, view)
    samples = []
    for _ in range(1000):
        started = time.perf_counter()
        decide(policy, view)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    with tempfile.TemporaryDirectory() as directory:
        for i in range(20):
            (pathlib.Path(directory) / f"tenant{i:02d}.yaml").write_text(ten_rule_tenant(f"tenant{i:02d}"))
        started = time.perf_counter()
        store = PolicyStore(directory)
        cold = time.perf_counter() - started
        assert store.status.ok and len(store.snapshot.policies) == 20
        started = time.perf_counter()
        store.reload()
        unchanged = time.perf_counter() - started
    payload = {
        "machine": machine(),
        "decision_latency_ms": {
            "rules": 10,
            "samples": len(samples),
            "p50": round(statistics.median(samples), 4),
            "p99": round(samples[int(len(samples) * 0.99) - 1], 4),
            "goal_p50": "<= 1 ms",
        },
        "reload_seconds_20_tenants": {
            "cold_load_all": round(cold, 3),
            "reload_nothing_changed": round(unchanged, 4),
        },
    }
    write("policy.json", payload)
    print(f"decision p50 {payload['decision_latency_ms']['p50']} ms, p99 {payload['decision_latency_ms']['p99']} ms; "
          f"20 tenants load {cold:.2f}s, unchanged reload {unchanged * 1000:.1f} ms")


if __name__ == "__main__":
    main()
