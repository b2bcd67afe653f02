"""Proto ⇄ domain conversion, in one place, used only by servicers and clients."""

from __future__ import annotations

import dataclasses
import math

from google.protobuf import json_format, struct_pb2

from rmesh.api.common.v1 import common_pb2
from rmesh.api.solver.v1 import solver_pb2
from rmesh.domain import Budget, Candidate, CheckResult, CheckSpec, Checkpoint, Precheck, SearchParams, TaskSpec, Usage, Verdict
from rmesh.errors import InvalidRequest
from rmesh.solving import Progress, SolveRequest, SolveResult


def struct_to_dict(message: struct_pb2.Struct, field_path: str = "") -> dict:
    """A Struct as JSON values; NaN and Infinity, which JSON cannot hold, are INVALID_ARGUMENT
    naming their field."""
    try:
        return json_format.MessageToDict(message)
    except ValueError:
        where = _non_finite_path(message, field_path) or field_path or "request"
        raise InvalidRequest(where, "must be a finite number (NaN and Infinity are not JSON)") from None


def _non_finite_path(value, path: str) -> str:
    """Where in a Struct (or Value, or ListValue) the first non-finite number sits; "" if nowhere."""
    if isinstance(value, struct_pb2.Struct):
        items = ((f"{path}.{k}" if path else k, v) for k, v in value.fields.items())
    elif isinstance(value, struct_pb2.ListValue):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value.values))
    else:
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            return path if not math.isfinite(value.number_value) else ""
        if kind in ("struct_value", "list_value"):
            return _non_finite_path(getattr(value, kind), path)
        return ""
    for item_path, item in items:
        found = _non_finite_path(item, item_path)
        if found:
            return found
    return ""


def dict_to_struct(value: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def task_from_proto(task: common_pb2.Task) -> TaskSpec:
    return TaskSpec(
        kind=task.kind,
        checks=tuple(
            CheckSpec(c.name, struct_to_dict(c.params, f"task.checks[{i}].params")) for i, c in enumerate(task.checks)
        ),
    )


def task_to_proto(task: TaskSpec) -> common_pb2.Task:
    return common_pb2.Task(
        kind=task.kind, checks=[common_pb2.Check(name=c.name, params=dict_to_struct(c.params)) for c in task.checks]
    )


def _flat(value, names) -> dict:
    return {name: getattr(value, name) for name in names}


_USAGE = [f.name for f in dataclasses.fields(Usage)]
_BUDGET = [f.name for f in dataclasses.fields(Budget)]
_SEARCH = [f.name for f in dataclasses.fields(SearchParams) if f.name != "temperature"]


def usage_to_proto(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(**_flat(usage, _USAGE))


def usage_from_proto(usage: common_pb2.Usage) -> Usage:
    return Usage(**_flat(usage, _USAGE))


def budget_to_proto(budget: Budget) -> common_pb2.Budget:
    return common_pb2.Budget(**_flat(budget, _BUDGET))


def budget_from_proto(budget: common_pb2.Budget) -> Budget:
    return Budget(**_flat(budget, _BUDGET))


def search_to_proto(search: SearchParams) -> common_pb2.SearchParams:
    return common_pb2.SearchParams(temperature=search.temperature, **_flat(search, _SEARCH))


def search_from_proto(search: common_pb2.SearchParams) -> SearchParams:
    values = _flat(search, _SEARCH)
    values["aggregation"] = values["aggregation"] or "min"
    return SearchParams(temperature=search.temperature if search.HasField("temperature") else None, **values)


def checkpoint_to_proto(cp: Checkpoint) -> common_pb2.Checkpoint:
    return common_pb2.Checkpoint(text=cp.text, cites=list(cp.cites))


def candidate_to_proto(c: Candidate) -> common_pb2.Candidate:
    return common_pb2.Candidate(
        id=c.id,
        checkpoints=[checkpoint_to_proto(cp) for cp in c.checkpoints],
        verification_summary=c.verification_summary,
        final_answer=c.final_answer,
        well_formed=c.well_formed,
    )


def candidate_from_proto(c: common_pb2.Candidate) -> Candidate:
    return Candidate(
        id=c.id,
        checkpoints=tuple(Checkpoint(cp.text, tuple(cp.cites)) for cp in c.checkpoints),
        verification_summary=c.verification_summary,
        final_answer=c.final_answer,
        well_formed=c.well_formed,
    )


def check_result_to_proto(r: CheckResult) -> common_pb2.CheckResult:
    return common_pb2.CheckResult(name=r.name, passed=r.passed, detail=r.detail)


def verdict_to_proto(v: Verdict) -> common_pb2.Verdict:
    return common_pb2.Verdict(
        release=v.release,
        missing_evidence=list(v.missing_evidence),
        unknown_citations=list(v.unknown_citations),
        uncited_required=list(v.uncited_required),
        ungrounded_claims=list(v.ungrounded_claims),
        step_scores=list(v.step_scores),
        learned_scored=v.learned_score is not None,
        learned_score=v.learned_score or 0.0,
        learned_step_scores=list(v.learned_step_scores),
        checks=[check_result_to_proto(r) for r in v.checks],
        next_step=v.next_step,
        score=v.score,
    )


def verdict_from_proto(v: common_pb2.Verdict) -> Verdict:
    return Verdict(
        release=v.release,
        missing_evidence=tuple(v.missing_evidence),
        unknown_citations=tuple(v.unknown_citations),
        uncited_required=tuple(v.uncited_required),
        ungrounded_claims=tuple(v.ungrounded_claims),
        step_scores=tuple(v.step_scores),
        learned_score=v.learned_score if v.learned_scored else None,
        learned_step_scores=tuple(v.learned_step_scores),
        checks=tuple(CheckResult(r.name, r.passed, r.detail) for r in v.checks),
        next_step=v.next_step,
        score=v.score,
    )


# -- solver ---------------------------------------------------------------------------------
def solve_request_to_proto(r: SolveRequest) -> solver_pb2.SolveRequest:
    return solver_pb2.SolveRequest(
        problem=r.problem,
        task=task_to_proto(r.task),
        evidence=dict(r.evidence),
        strategy=r.strategy,
        budget=budget_to_proto(r.budget),
        required_evidence=list(r.required_evidence),
        tenant=r.tenant,
        seed=r.seed,
        search=search_to_proto(r.search),
        answer_shape=None if r.precheck is None else solver_pb2.AnswerShape(
            numeric_answer=r.precheck.numeric_answer,
            expression_answer=r.precheck.expression_answer,
            learned_max_n=r.precheck.learned_max_n,
        ),
    )


def solve_request_from_proto(r: solver_pb2.SolveRequest) -> SolveRequest:
    return SolveRequest(
        problem=r.problem,
        task=task_from_proto(r.task),
        evidence=dict(r.evidence),
        strategy=r.strategy,
        budget=budget_from_proto(r.budget),
        required_evidence=tuple(r.required_evidence),
        tenant=r.tenant,
        seed=r.seed,
        search=search_from_proto(r.search),
        precheck=Precheck(
            missing_evidence=(),
            next_step="",
            numeric_answer=r.answer_shape.numeric_answer,
            expression_answer=r.answer_shape.expression_answer,
            learned_max_n=r.answer_shape.learned_max_n,
        ) if r.HasField("answer_shape") else None,
    )


def progress_to_proto(p: Progress) -> solver_pb2.SolveProgress:
    return solver_pb2.SolveProgress(
        stage=p.stage,
        branches_started=p.branches_started,
        branches_done=p.branches_done,
        usage=usage_to_proto(p.usage),
        checks_passed=p.checks_passed,
        checks_total=p.checks_total,
        round=p.round,
        best_score=p.best_score,
        branches_pruned=p.branches_pruned,
        stop_reason=p.stop_reason,
    )


def progress_from_proto(p: solver_pb2.SolveProgress) -> Progress:
    return Progress(
        stage=p.stage,
        branches_started=p.branches_started,
        branches_done=p.branches_done,
        usage=usage_from_proto(p.usage),
        checks_passed=p.checks_passed,
        checks_total=p.checks_total,
        round=p.round,
        best_score=p.best_score,
        branches_pruned=p.branches_pruned,
        stop_reason=p.stop_reason,
    )


def result_to_proto(r: SolveResult) -> solver_pb2.SolveResult:
    out = solver_pb2.SolveResult(
        usage=usage_to_proto(r.usage),
        stop_reason=r.stop_reason,
        candidates_evaluated=r.candidates_evaluated,
        eligible=r.eligible,
        strategy=r.strategy,
        vote_share=r.vote_share,
        peak_live_branches=r.peak_live_branches,
        peak_kv_bytes=r.peak_kv_bytes,
    )
    if r.best is not None:
        out.best.CopyFrom(candidate_to_proto(r.best))
    if r.verdict is not None:
        out.verdict.CopyFrom(verdict_to_proto(r.verdict))
    return out


def result_from_proto(r: solver_pb2.SolveResult) -> SolveResult:
    return SolveResult(
        best=candidate_from_proto(r.best) if r.HasField("best") else None,
        verdict=verdict_from_proto(r.verdict) if r.HasField("verdict") else None,
        usage=usage_from_proto(r.usage),
        stop_reason=r.stop_reason,
        candidates_evaluated=r.candidates_evaluated,
        eligible=r.eligible,
        strategy=r.strategy,
        vote_share=r.vote_share,
        peak_live_branches=r.peak_live_branches,
        peak_kv_bytes=r.peak_kv_bytes,
    )
