"""Thin gRPC servicer over VerifierCore."""

from __future__ import annotations

import asyncio

import grpc

from rmesh import convert
from rmesh.api.verifier.v1 import verifier_pb2, verifier_pb2_grpc
from rmesh.errors import InvalidRequest
from rmesh.grpc_edge import begin_call, unary_edge
from rmesh.verifier_svc.core import LEARNED_NONE, LEARNED_OUTCOME, LEARNED_PROCESS, VerifierCore

SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name
_LEARNED_MODES = {
    verifier_pb2.LEARNED_SCORE_MODE_UNSPECIFIED: LEARNED_NONE,
    verifier_pb2.LEARNED_SCORE_MODE_OUTCOME: LEARNED_OUTCOME,
    verifier_pb2.LEARNED_SCORE_MODE_PROCESS: LEARNED_PROCESS,
}


def _learned_mode(value: int) -> str:
    if value not in _LEARNED_MODES:
        raise InvalidRequest("learned_score", f"unknown mode {value}; known: {sorted(_LEARNED_MODES)}")
    return _LEARNED_MODES[value]


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    def __init__(self, core: VerifierCore) -> None:
        self.core = core

    @unary_edge
    async def Precheck(self, request, context: grpc.aio.ServicerContext):
        task = convert.task_from_proto(request.task)
        args = (task, dict(request.evidence), list(request.required_evidence))
        result = await asyncio.to_thread(self.core.precheck, *args) if self.core.blocking(task) else self.core.precheck(*args)
        return verifier_pb2.PrecheckResponse(
            missing_evidence=list(result.missing_evidence),
            next_step=result.next_step,
            numeric_answer=result.numeric_answer,
            expression_answer=result.expression_answer,
            learned_scorer=result.learned_scorer,
            learned_max_n=result.learned_max_n,
        )

    @unary_edge
    async def Verify(self, request, context: grpc.aio.ServicerContext):
        deadline = begin_call(context)
        verdicts, info = await self.core.verify_scored(
            convert.task_from_proto(request.task),
            dict(request.evidence),
            list(request.required_evidence),
            [convert.candidate_from_proto(c) for c in request.candidates],
            problem=request.problem,
            learned=_learned_mode(request.learned_score),
            aggregation=request.aggregation or "min",
            deadline=deadline,
        )
        return verifier_pb2.VerifyResponse(
            verdicts=[convert.verdict_to_proto(v) for v in verdicts],
            scorer=info.scorer,
            calibrated=info.calibrated,
            release_threshold=info.release_threshold,
            max_n=info.max_n,
        )

    async def ListCheckers(self, request, context):
        return verifier_pb2.ListCheckersResponse(names=self.core.checker_names)


def add_to_server(servicer: VerifierServicer, server: grpc.aio.Server) -> list[str]:
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, server)
    return [SERVICE_NAME]
