"""Router-only proto ⇄ domain conversion: the public Solve request and its event stream."""

from __future__ import annotations

from rmesh.api.router.v1 import router_pb2
from rmesh.convert import (
    budget_to_proto,
    check_result_to_proto,
    checkpoint_to_proto,
    progress_to_proto,
    search_to_proto,
    struct_to_dict,
    task_from_proto,
    usage_to_proto,
)
from rmesh.router_svc import core as router_core
from rmesh.router_svc.policy import model
from rmesh.solving import Progress

_OUTCOME_KINDS = {
    router_core.OUTCOME_RELEASED: router_pb2.OUTCOME_KIND_RELEASED,
    router_core.OUTCOME_MISSING_EVIDENCE: router_pb2.OUTCOME_KIND_MISSING_EVIDENCE,
    router_core.OUTCOME_NO_ELIGIBLE_ANSWER: router_pb2.OUTCOME_KIND_NO_ELIGIBLE_ANSWER,
    router_core.OUTCOME_ESCALATED: router_pb2.OUTCOME_KIND_ESCALATED,
}
ASSURANCES = {
    "": router_pb2.ASSURANCE_UNSPECIFIED,
    model.UNVERIFIED: router_pb2.ASSURANCE_UNVERIFIED,
    model.CALIBRATED_SCORE: router_pb2.ASSURANCE_CALIBRATED_SCORE,
    model.EVIDENCE_GROUNDED: router_pb2.ASSURANCE_EVIDENCE_GROUNDED,
    model.EXACT_CHECKS: router_pb2.ASSURANCE_EXACT_CHECKS,
    model.HUMAN_APPROVED: router_pb2.ASSURANCE_HUMAN_APPROVED,
}


def router_request_from_proto(r: router_pb2.SolveRequest) -> router_core.RouterRequest:
    return router_core.RouterRequest(
        problem=r.problem,
        task=task_from_proto(r.task),
        evidence=struct_to_dict(r.evidence, "evidence"),
        high_impact=r.high_impact,
        await_review=r.await_review,
    )


def router_event_to_proto(event: router_core.Event) -> router_pb2.SolveResponse:
    if isinstance(event, router_core.Status):
        return router_pb2.SolveResponse(status=router_pb2.StatusEvent(message=event.message))
    if isinstance(event, router_core.Config):
        return router_pb2.SolveResponse(
            config=router_pb2.ConfigEvent(
                strategy=event.strategy,
                budget=budget_to_proto(event.budget),
                tenant=event.tenant,
                required_evidence=list(event.required_evidence),
                reason=event.reason,
                policy_revision=event.policy_revision,
                search=search_to_proto(event.search),
            )
        )
    if isinstance(event, Progress):
        p = progress_to_proto(event)
        return router_pb2.SolveResponse(
            progress=router_pb2.ProgressEvent(
                stage=p.stage,
                branches_started=p.branches_started,
                branches_done=p.branches_done,
                usage=p.usage,
                checks_passed=p.checks_passed,
                checks_total=p.checks_total,
                round=p.round,
                branches_pruned=p.branches_pruned,
                stop_reason=p.stop_reason,
            )
        )
    return router_pb2.SolveResponse(outcome=outcome_to_proto(event))


def outcome_to_proto(event: router_core.Outcome) -> router_pb2.Outcome:
    return router_pb2.Outcome(
            kind=_OUTCOME_KINDS[event.kind],
            released=event.released,
            answer=event.answer,
            checkpoints=[checkpoint_to_proto(cp) for cp in event.checkpoints],
            missing_evidence=list(event.missing_evidence),
            next_step=event.next_step,
            strategy=event.strategy,
            usage=usage_to_proto(event.usage),
            checks=[check_result_to_proto(c) for c in event.checks],
            stop_reason=event.stop_reason,
            reason=event.reason,
            policy_revision=event.policy_revision,
            vote_share=event.vote_share,
            review_id=event.review_id,
            assurance=ASSURANCES[event.assurance],
            evidence_sources=[
                evidence_source_to_proto(p.key, p.source, p.fetched_at, p.sha256) for p in event.evidence_sources
            ],
    )


def evidence_source_to_proto(key: str, source: str, fetched_at: float, sha256: str) -> router_pb2.EvidenceSource:
    """One value's provenance; the caller's values carry no fetch time."""
    message = router_pb2.EvidenceSource(key=key, source=source, sha256=sha256)
    if fetched_at > 0:
        message.fetched_at.FromNanoseconds(int(fetched_at * 1e9))
    return message
