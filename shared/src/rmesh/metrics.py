"""Prometheus metrics, served when ``RMESH_METRICS_ADDR`` (host:port) is set.

Each metric lives in the process's default registry; ``rmesh serve`` serves them on one port.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

POLICY_RELOADS = Counter("rmesh_policy_reloads", "Tenant-directory reloads, by result", ["result"])
POLICY_LAST_RELOAD_SUCCESS = Gauge("rmesh_policy_last_reload_success", "1 when the last reload accepted every file, else 0")
POLICY_LAST_RELOAD_TIME = Gauge("rmesh_policy_last_reload_timestamp_seconds", "Unix time of the last reload")
POLICY_REVISION = Gauge("rmesh_policy_revision_info", "The revision each tenant is served with", ["tenant", "revision"])


def record_reload(status, snapshot) -> None:
    POLICY_RELOADS.labels(result="ok" if status.ok else "error").inc()
    POLICY_LAST_RELOAD_SUCCESS.set(1 if status.ok else 0)
    POLICY_LAST_RELOAD_TIME.set(status.when)
    POLICY_REVISION.clear()
    for tenant, policy in snapshot.policies.items():
        POLICY_REVISION.labels(tenant=tenant, revision=policy.revision).set(1)


def serve_metrics(address: str):
    """Start the /metrics HTTP endpoint; returns the bound port."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1")
    return server.server_port

REQUESTS = Counter("rmesh_requests", "Solve calls by tenant and outcome", ["tenant", "outcome"])
TOKENS_GENERATED = Counter("rmesh_tokens_generated", "Tokens generated for released or refused answers", ["tenant"])
TOKENS_CACHED = Counter("rmesh_tokens_cached", "Prompt tokens served from a shared prefix", ["tenant"])
STRATEGY_RUNS = Counter("rmesh_strategy_runs", "Searches the solver ran, by strategy and stop reason", ["strategy", "stop_reason"])
ESCALATIONS = Counter("rmesh_escalations", "Escalations: up the strategy ladder, or to human review", ["kind"])
REVIEW_QUEUE = Gauge("rmesh_review_queue_depth", "Reviews waiting for a person")
KV_IN_USE = Gauge("rmesh_kv_budget_bytes_in_use", "KV bytes reserved by running requests in this solver")
KV_CAPACITY = Gauge("rmesh_kv_budget_bytes", "The solver's KV budget")

# Outcome kinds as the requests metric names them.
OUTCOMES = {
    "released": "released",
    "missing_evidence": "not_released",
    "no_eligible_answer": "no_answer",
    "escalated": "escalated",
}
