"""Tenant files: policy/tenants/<tenant>.yaml. Small on purpose; the CEL policy engine replaces it.

A file names the tenant, the SHA-256 of each API key it accepts, the default strategy and
budget, and the evidence keys required per task kind. The revision of a tenant is the content
hash of its file, so every decision can name the file version that made it.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from rmesh.domain import Budget, SearchParams
from rmesh.errors import FailedPrecondition, Unauthenticated


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hashes: frozenset[str]
    default_strategy: str
    budget: Budget
    strategy_by_kind: Mapping[str, str] = field(default_factory=dict)
    required_evidence_by_kind: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    search: SearchParams = SearchParams()
    revision: str = ""
    source: str = ""

    def strategy_for(self, kind: str) -> str:
        return self.strategy_by_kind.get(kind, self.default_strategy)

    def required_evidence_for(self, kind: str) -> tuple[str, ...]:
        return self.required_evidence_by_kind.get(kind, self.required_evidence_by_kind.get("*", ()))


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


_BUDGET_FIELDS = {
    "max_tokens": int,
    "max_branches": int,
    "max_depth": int,
    "wall_clock_seconds": float,
    "max_tokens_per_branch": int,
    "max_kv_bytes": int,
}
_SEARCH_FIELDS = {
    "samples": int,
    "beam_width": int,
    "branching_factor": int,
    "prune_below": float,
    "exploration": float,
    "no_improvement_rounds": int,
    "temperature": float,
    "learned_score": str,
    "aggregation": str,
}


def _parse(path: pathlib.Path, text: str) -> Tenant:
    def bad(reason: str) -> FailedPrecondition:
        return FailedPrecondition(f"{path}: {reason}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise bad(f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise bad("top level must be a mapping")
    name = doc.get("tenant")
    if not isinstance(name, str) or not name:
        raise bad("'tenant' must be a non-empty string")
    hashes = doc.get("api_key_sha256", [])
    if not isinstance(hashes, list) or not all(isinstance(h, str) and len(h) == 64 for h in hashes):
        raise bad("'api_key_sha256' must be a list of 64-character hex digests")
    raw_budget: dict[str, Any] = doc.get("budget", {}) or {}
    unknown = set(raw_budget) - set(_BUDGET_FIELDS)
    if unknown:
        raise bad(f"unknown budget fields: {', '.join(sorted(unknown))}")
    try:
        budget = Budget(**{k: _BUDGET_FIELDS[k](v) for k, v in raw_budget.items()})
    except (TypeError, ValueError) as exc:
        raise bad(f"budget: {exc}") from None
    raw_search: dict[str, Any] = doc.get("search", {}) or {}
    unknown = set(raw_search) - set(_SEARCH_FIELDS)
    if unknown:
        raise bad(f"unknown search fields: {', '.join(sorted(unknown))}")
    try:
        search = SearchParams(**{k: _SEARCH_FIELDS[k](v) for k, v in raw_search.items()})
    except (TypeError, ValueError) as exc:
        raise bad(f"search: {exc}") from None
    required = doc.get("required_evidence", {}) or {}
    if not isinstance(required, dict) or not all(isinstance(v, list) for v in required.values()):
        raise bad("'required_evidence' must map task kinds to lists of keys")
    return Tenant(
        name=name,
        key_hashes=frozenset(h.lower() for h in hashes),
        default_strategy=str(doc.get("default_strategy", "best_of_n")),
        budget=budget,
        strategy_by_kind=dict(doc.get("strategy_by_kind", {}) or {}),
        required_evidence_by_kind={k: tuple(str(x) for x in v) for k, v in required.items()},
        search=search,
        revision=hashlib.sha256(text.encode()).hexdigest()[:12],
        source=str(path),
    )


class TenantRegistry:
    def __init__(self, tenants: list[Tenant]) -> None:
        self._by_hash: dict[str, Tenant] = {}
        for tenant in tenants:
            for digest in tenant.key_hashes:
                self._by_hash[digest] = tenant

    @classmethod
    def load_dir(cls, directory: str | pathlib.Path) -> "TenantRegistry":
        root = pathlib.Path(directory)
        if not root.is_dir():
            raise FailedPrecondition(f"tenant directory {root} does not exist")
        return cls([_parse(p, p.read_text()) for p in sorted(root.glob("*.yaml"))])

    def authenticate(self, authorization: str | None) -> Tenant:
        if not authorization:
            raise Unauthenticated("authorization metadata is missing; send 'Bearer <api key>'")
        key = authorization.strip()
        if key.lower().startswith("bearer "):
            key = key[7:].strip()
        tenant = self._by_hash.get(hash_key(key))
        if tenant is None:
            raise Unauthenticated("authorization: unknown API key")
        return tenant
