"""Building the API's request messages from plain Python values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from rmesh.api.review.v1 import review_pb2
from rmesh.api.router.v1 import router_pb2

ACTIONS = {
    "approve": review_pb2.REVIEW_ACTION_APPROVE,
    "edit": review_pb2.REVIEW_ACTION_EDIT,
    "reject": review_pb2.REVIEW_ACTION_REJECT,
}


def build_request(
    problem: str | router_pb2.SolveRequest | Mapping[str, Any],
    *,
    kind: str = "",
    checks: Sequence[Mapping[str, Any]] = (),
    evidence: Mapping[str, str] | None = None,
    high_impact: bool = False,
    await_review: bool = False,
) -> router_pb2.SolveRequest:
    """A SolveRequest from a problem text and keywords, a dict in the API's JSON shape, or a
    ready message. A dict that does not fit the API raises ValueError naming the field."""
    if isinstance(problem, (router_pb2.SolveRequest, Mapping)):
        keywords = (("kind", kind), ("checks", checks), ("evidence", evidence), ("high_impact", high_impact), ("await_review", await_review))
        given = [name for name, value in keywords if value]
        if given:
            raise ValueError(f"{', '.join(given)}: give these inside the request, not beside a whole request")
        if isinstance(problem, router_pb2.SolveRequest):
            return problem
        try:
            return json_format.ParseDict(dict(problem), router_pb2.SolveRequest())
        except json_format.ParseError as exc:
            raise ValueError(f"request does not fit the API: {exc}") from None
    if not isinstance(problem, str):
        raise ValueError(f"problem: must be a string, a dict in the API's JSON shape or a SolveRequest, not {type(problem).__name__}")
    if evidence is not None and not isinstance(evidence, Mapping):
        raise ValueError("evidence: must be a mapping of key to string")
    if isinstance(checks, (str, bytes, Mapping)) or not all(isinstance(c, Mapping) for c in checks):
        raise ValueError("checks: must be a list of mappings such as {'name': 'arithmetic', 'params': {...}}")
    body: dict[str, Any] = {"problem": problem, "high_impact": high_impact, "await_review": await_review}
    if kind or checks:
        body["task"] = {"kind": kind, "checks": [dict(c) for c in checks]}
    if evidence:
        body["evidence"] = dict(evidence)
    return build_request(body)


def review_state(state: str | None) -> int:
    """``"pending"`` → REVIEW_STATE_PENDING; None or "" → unspecified (every state)."""
    if not state:
        return review_pb2.REVIEW_STATE_UNSPECIFIED
    try:
        return review_pb2.ReviewState.Value(f"REVIEW_STATE_{state.upper()}")
    except ValueError:
        known = ", ".join(n.removeprefix("REVIEW_STATE_").lower() for n in review_pb2.ReviewState.keys()[1:])
        raise ValueError(f"state: {state!r} is not one of {known}") from None


def resolve_request(review_id: str, action: str, answer: str = "", comment: str = "") -> review_pb2.ResolveReviewRequest:
    if action not in ACTIONS:
        raise ValueError(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
    return review_pb2.ResolveReviewRequest(id=review_id, action=ACTIONS[action], answer=answer, comment=comment)


def event_of(message: router_pb2.SolveResponse):
    """The one event a stream message carries."""
    return getattr(message, message.WhichOneof("event"))
