"""Thin gRPC servicer over VerifierCore."""

from __future__ import annotations

import asyncio

import grpc

from rmesh import convert
from rmesh.api.verifier.v1 import verifier_pb2, verifier_pb2_grpc
from rmesh.errors import MeshError
from rmesh.grpc_edge import abort, abort_internal
from rmesh.verifier_svc.core import VerifierCore

SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    def __init__(self, core: VerifierCore) -> None:
        self.core = core

    async def Precheck(self, request, context: grpc.aio.ServicerContext):
        try:
            result = await asyncio.to_thread(
                self.core.precheck,
                convert.task_from_proto(request.task),
                dict(request.evidence),
                list(request.required_evidence),
            )
        except MeshError as exc:
            await abort(context, exc)
        except Exception as exc:
            await abort_internal(context, exc)
        return verifier_pb2.PrecheckResponse(
            missing_evidence=list(result.missing_evidence),
            next_step=result.next_step,
            numeric_answer=result.numeric_answer,
            expression_answer=result.expression_answer,
        )

    async def Verify(self, request, context: grpc.aio.ServicerContext):
        try:
            # Checkers may run sandboxed code for seconds: off the event loop, so the
            # verifier keeps answering health checks and other calls meanwhile.
            verdicts = await asyncio.to_thread(
                self.core.verify,
                convert.task_from_proto(request.task),
                dict(request.evidence),
                list(request.required_evidence),
                [convert.candidate_from_proto(c) for c in request.candidates],
            )
        except MeshError as exc:
            await abort(context, exc)
        except Exception as exc:
            await abort_internal(context, exc)
        return verifier_pb2.VerifyResponse(verdicts=[convert.verdict_to_proto(v) for v in verdicts])

    async def ListCheckers(self, request, context):
        return verifier_pb2.ListCheckersResponse(names=self.core.checker_names)


def add_to_server(servicer: VerifierServicer, server: grpc.aio.Server) -> list[str]:
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, server)
    return [SERVICE_NAME]
