"""Thin gRPC servicer over the review store: tenant isolation and the reviewer role at the edge."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import timestamp_pb2

from rmesh.api.review.v1 import review_pb2, review_pb2_grpc
from rmesh.errors import InvalidRequest, MeshError, ResourceExhausted
from rmesh.grpc_edge import abort, abort_internal, unary_edge
from rmesh.router_svc.policy.model import ROLE_REVIEWER
from rmesh.router_svc.policy.store import PolicyStore
from rmesh.convert import check_result_to_proto, checkpoint_to_proto, usage_to_proto
from rmesh.router_svc import reviews
from rmesh.router_svc.convert import ASSURANCES, evidence_source_to_proto, outcome_to_proto
from rmesh.router_svc.core import draft_parts, outcome_of_review

SERVICE_NAME = review_pb2.DESCRIPTOR.services_by_name["ReviewService"].full_name
WATCH_INTERVAL_SECONDS = 0.2
# Open WatchReview streams per tenant on one router. Each polls the review store, so a tenant
# opening streams without end would starve every tenant's review calls.
MAX_WATCHES_PER_TENANT = 16
_STATES = {
    reviews.PENDING: review_pb2.REVIEW_STATE_PENDING,
    reviews.APPROVED: review_pb2.REVIEW_STATE_APPROVED,
    reviews.EDITED: review_pb2.REVIEW_STATE_EDITED,
    reviews.REJECTED: review_pb2.REVIEW_STATE_REJECTED,
    reviews.EXPIRED: review_pb2.REVIEW_STATE_EXPIRED,
}
_STATE_NAMES = {v: k for k, v in _STATES.items()}
_ACTIONS = {
    review_pb2.REVIEW_ACTION_APPROVE: "approve",
    review_pb2.REVIEW_ACTION_EDIT: "edit",
    review_pb2.REVIEW_ACTION_REJECT: "reject",
}


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def draft_to_proto(draft: dict) -> review_pb2.Draft:
    checkpoints, checks, usage = draft_parts(draft)
    return review_pb2.Draft(
        answer=draft.get("answer", ""),
        checkpoints=[checkpoint_to_proto(cp) for cp in checkpoints],
        checks=[check_result_to_proto(c) for c in checks],
        assurance=ASSURANCES[draft.get("assurance", "")],
        strategy=draft.get("strategy", ""),
        usage=usage_to_proto(usage),
        gate_reason=draft.get("gate_reason", ""),
    )


def review_to_proto(r: reviews.Review) -> review_pb2.Review:
    decided = outcome_of_review(r)
    return review_pb2.Review(
        id=r.id,
        tenant=r.tenant,
        state=_STATES[r.state],
        problem=r.problem,
        reason=r.reason,
        evidence=r.evidence,
        policy_revision=r.policy_revision,
        created_at=_timestamp(r.created_at),
        expires_at=_timestamp(r.expires_at),
        resolved_at=_timestamp(r.resolved_at),
        reviewer=r.reviewer,
        comment=r.comment,
        answer=r.answer,
        draft=draft_to_proto(r.draft),
        outcome=outcome_to_proto(decided) if decided is not None else None,
        caller=r.caller,
        evidence_sources=[
            evidence_source_to_proto(str(s["key"]), str(s["source"]), float(s["fetched_at"]), str(s["sha256"]))
            for s in r.draft.get("evidence_sources", [])
        ],
    )


class ReviewServicer(review_pb2_grpc.ReviewServiceServicer):
    def __init__(self, store: reviews.ReviewStore, policies: PolicyStore) -> None:
        self.store = store
        self.policies = policies
        self._watches: dict[str, int] = {}  # tenant -> open WatchReview streams

    def _caller(self, context, role: str | None = None):
        """The tenant, the key, and whose reviews it sees: a caller key only its own requests'
        (None: a reviewer sees the whole tenant's)."""
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        try:
            policy, key = self.policies.authenticate(authorization, role or "caller")
        except MeshError:
            if role is not None:
                raise
            policy, key = self.policies.authenticate(authorization, ROLE_REVIEWER)
        return policy, key, (None if key.role == ROLE_REVIEWER else key.name)

    @unary_edge
    async def ListReviews(self, request, context):
        policy, _, own = self._caller(context)
        if request.state and request.state not in _STATE_NAMES:
            raise InvalidRequest("state", f"unknown state {request.state}")
        limit = request.limit or 100
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit", "must be between 1 and 1000")
        found = await asyncio.to_thread(self.store.list, policy.tenant, _STATE_NAMES.get(request.state, ""), limit, own)
        return review_pb2.ListReviewsResponse(reviews=[review_to_proto(r) for r in found])

    @unary_edge
    async def GetReview(self, request, context):
        policy, _, own = self._caller(context)
        _review_id(request.id)
        review = await asyncio.to_thread(self.store.get, policy.tenant, request.id, own)
        return review_pb2.GetReviewResponse(review=review_to_proto(review))

    async def WatchReview(self, request, context):
        try:
            policy, _, own = self._caller(context)
            _review_id(request.id)
            tenant = policy.tenant
            if self._watches.get(tenant, 0) >= MAX_WATCHES_PER_TENANT:
                raise ResourceExhausted(
                    f"WatchReview: {MAX_WATCHES_PER_TENANT} streams of this tenant are open on this router; "
                    "close one, or poll GetReview"
                )
            self._watches[tenant] = self._watches.get(tenant, 0) + 1
            try:
                last = None
                while True:
                    review = await asyncio.to_thread(self.store.get, tenant, request.id, own)
                    if review != last:
                        yield review_pb2.WatchReviewResponse(review=review_to_proto(review))
                        last = review
                    if review.state != reviews.PENDING:
                        return
                    await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            finally:
                self._watches[tenant] -= 1
                if not self._watches[tenant]:
                    del self._watches[tenant]
        except MeshError as exc:
            await abort(context, exc)
        except Exception as exc:
            await abort_internal(context, exc)

    @unary_edge
    async def ResolveReview(self, request, context):
        policy, key, _ = self._caller(context, ROLE_REVIEWER)
        _review_id(request.id)
        action = _ACTIONS.get(request.action)
        if action is None:
            raise InvalidRequest("action", "must be APPROVE, EDIT or REJECT")
        review = await asyncio.to_thread(
            self.store.resolve, policy.tenant, request.id, action, key.name, request.answer, request.comment
        )
        return review_pb2.ResolveReviewResponse(review=review_to_proto(review))


def _review_id(review_id: str) -> None:
    if not review_id:
        raise InvalidRequest("id", "must not be empty")
    if len(review_id) > 128:
        raise InvalidRequest("id", "longer than 128 characters")


def add_to_server(servicer: ReviewServicer, server: grpc.aio.Server) -> list[str]:
    review_pb2_grpc.add_ReviewServiceServicer_to_server(servicer, server)
    return [SERVICE_NAME]
