"""Prometheus metrics move with the traffic that should move them."""

from __future__ import annotations

import pathlib

import yaml
from google.protobuf import json_format
from prometheus_client import REGISTRY

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent


def value(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def solve(mesh, request):
    async with mesh.channel() as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return [e async for e in stub.Solve(request, metadata=[("authorization", "Bearer demo-key")], timeout=120)]


async def test_outcomes_tokens_strategies_and_escalations_are_counted(mesh):
    doc = yaml.safe_load((ROOT / "examples" / "fulfillment.yaml").read_text())
    released_before = value("rmesh_requests_total", {"tenant": "demo", "outcome": "released"})
    tokens_before = value("rmesh_tokens_generated_total", {"tenant": "demo"})
    runs_before = sum(
        s.value for m in REGISTRY.collect() if m.name == "rmesh_strategy_runs" for s in m.samples if s.name.endswith("_total")
    )
    events = await solve(mesh, json_format.ParseDict(doc, router_pb2.SolveRequest()))
    assert events[-1].outcome.released
    assert value("rmesh_requests_total", {"tenant": "demo", "outcome": "released"}) == released_before + 1
    assert value("rmesh_tokens_generated_total", {"tenant": "demo"}) == tokens_before + events[-1].outcome.usage.completion_tokens
    runs_after = sum(
        s.value for m in REGISTRY.collect() if m.name == "rmesh_strategy_runs" for s in m.samples if s.name.endswith("_total")
    )
    assert runs_after == runs_before + 1
    assert value("rmesh_kv_budget_bytes") > 0 and value("rmesh_kv_budget_bytes_in_use") == 0

    escalated_before = value("rmesh_escalations_total", {"kind": "human_review"})
    not_released_before = value("rmesh_requests_total", {"tenant": "demo", "outcome": "escalated"})
    await solve(mesh, router_pb2.SolveRequest(problem="Approve this refund?", high_impact=True))
    assert value("rmesh_escalations_total", {"kind": "human_review"}) == escalated_before + 1
    assert value("rmesh_requests_total", {"tenant": "demo", "outcome": "escalated"}) == not_released_before + 1
