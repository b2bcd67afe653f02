"""``route_constraints``: the answer is a path from ``params.start`` to ``params.end`` that uses
no edge in ``params.blocked`` (pairs [from, to]; a blocked edge is closed both ways, like the
seed's bridge). With ``params.edges`` the path may use only those edges."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rmesh.domain import CheckResult
from rmesh.errors import InvalidRequest

_SEPARATORS = re.compile(r"\s*(?:->|→|—|–|,|;|\bthen\b|\bto\b|-)\s*")
MAX_EDGES = 10_000


@dataclass(frozen=True)
class Route:
    start: str
    end: str
    blocked: frozenset[frozenset[str]]
    edges: frozenset[frozenset[str]] | None


def parse_path(answer: str) -> list[str]:
    return [stop.strip().strip(".").lower() for stop in _SEPARATORS.split(answer.strip()) if stop.strip().strip(".")]


def _pairs(value: Any, field: str) -> frozenset[frozenset[str]]:
    if not isinstance(value, list) or len(value) > MAX_EDGES:
        raise InvalidRequest(field, f"must be a list of at most {MAX_EDGES} [from, to] pairs")
    pairs = set()
    for index, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)):
            raise InvalidRequest(f"{field}[{index}]", "must be a [from, to] pair of names")
        pairs.add(frozenset(x.strip().lower() for x in pair))
    return frozenset(pairs)


@dataclass(frozen=True)
class RouteConstraintsChecker:
    name: str = "route_constraints"
    numeric_answer: bool = False
    expression_answer: bool = False
    blocking: bool = False

    def prepare(self, params: dict[str, Any], field_path: str) -> Route:
        for key in ("start", "end"):
            if not isinstance(params.get(key), str) or not params[key].strip():
                raise InvalidRequest(f"{field_path}.{key}", "must be a non-empty string")
        blocked = _pairs(params.get("blocked", []), f"{field_path}.blocked")
        edges = _pairs(params["edges"], f"{field_path}.edges") if "edges" in params else None
        return Route(params["start"].strip().lower(), params["end"].strip().lower(), blocked, edges)

    def check(self, answer: str, prepared: Route) -> CheckResult:
        path = parse_path(answer)
        if len(path) < 2:
            return CheckResult(self.name, False, "answer is not a path of at least two stops")
        if path[0] != prepared.start or path[-1] != prepared.end:
            return CheckResult(self.name, False, f"path must run from {prepared.start} to {prepared.end}")
        for a, b in zip(path, path[1:]):
            edge = frozenset((a, b))
            if edge in prepared.blocked:
                return CheckResult(self.name, False, f"uses the blocked edge {a}-{b}")
            if prepared.edges is not None and edge not in prepared.edges:
                return CheckResult(self.name, False, f"uses {a}-{b}, which is not an edge")
        return CheckResult(self.name, True, "path reaches the end without a blocked edge")
