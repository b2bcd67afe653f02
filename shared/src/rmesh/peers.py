"""gRPC clients that implement the cores' ports; each call carries the remaining deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmesh import convert
from rmesh.api.solver.v1 import solver_pb2_grpc
from rmesh.api.verifier.v1 import verifier_pb2, verifier_pb2_grpc
from rmesh.domain import Candidate, Precheck, TaskSpec, Verdict
from rmesh.grpc_edge import error_from_rpc, remaining_timeout
from rmesh.solving import Progress, SolveRequest, SolveResult

VERIFIER_SERVICE = "rmesh.api.verifier.v1.VerifierService"
SOLVER_SERVICE = "rmesh.api.solver.v1.SolverService"
_LEARNED = {
    "": verifier_pb2.LEARNED_SCORE_MODE_UNSPECIFIED,
    "outcome": verifier_pb2.LEARNED_SCORE_MODE_OUTCOME,
    "process": verifier_pb2.LEARNED_SCORE_MODE_PROCESS,
}


class VerifierClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = verifier_pb2_grpc.VerifierServiceStub(channel)

    async def precheck(self, task: TaskSpec, evidence: Mapping[str, str], required: Sequence[str]) -> Precheck:
        request = verifier_pb2.PrecheckRequest(
            task=convert.task_to_proto(task), evidence=dict(evidence), required_evidence=list(required)
        )
        try:
            reply = await self._stub.Precheck(request, timeout=remaining_timeout())
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "verifier") from None
        return Precheck(
            tuple(reply.missing_evidence),
            reply.next_step,
            reply.numeric_answer,
            reply.expression_answer,
            reply.learned_scorer,
            reply.learned_max_n,
        )

    async def verify(
        self,
        task: TaskSpec,
        evidence: Mapping[str, str],
        required: Sequence[str],
        candidates: Sequence[Candidate],
        *,
        problem: str = "",
        learned: str = "",
        aggregation: str = "min",
    ) -> list[Verdict]:
        request = verifier_pb2.VerifyRequest(
            task=convert.task_to_proto(task),
            evidence=dict(evidence),
            required_evidence=list(required),
            candidates=[convert.candidate_to_proto(c) for c in candidates],
            problem=problem,
            learned_score=_LEARNED[learned],
            aggregation=aggregation,
        )
        try:
            reply = await self._stub.Verify(request, timeout=remaining_timeout())
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "verifier") from None
        return [convert.verdict_from_proto(v) for v in reply.verdicts]


# Checkers that run caller code; with a code verifier configured, only it sees these tasks.
CODE_CHECKS = frozenset({"python_tests"})


class CodeAwareVerifier:
    """Two verifiers behind one port: tasks with a code check go to ``code`` (a verifier deployed
    apart, say under a sandboxing runtime class), every other task to ``general``."""

    def __init__(self, general, code) -> None:
        self.general = general
        self.code = code

    def _for(self, task: TaskSpec):
        return self.code if any(spec.name in CODE_CHECKS for spec in task.checks) else self.general

    async def precheck(self, task: TaskSpec, evidence: Mapping[str, str], required: Sequence[str]) -> Precheck:
        return await self._for(task).precheck(task, evidence, required)

    async def verify(self, task: TaskSpec, evidence, required, candidates, **options) -> list[Verdict]:
        return await self._for(task).verify(task, evidence, required, candidates, **options)


def verifier_port(address: str, code_address: str, settings, tracer_provider=None) -> tuple[object, list[grpc.aio.Channel]]:
    """The verifier client a service calls, and the channels to close with it: one verifier, or
    with ``code_address`` a separate one for code checks."""
    from rmesh.grpc_edge import create_channel

    channel = create_channel(address, settings, [VERIFIER_SERVICE], tracer_provider=tracer_provider)
    if not code_address:
        return VerifierClient(channel), [channel]
    code_channel = create_channel(code_address, settings, [VERIFIER_SERVICE], tracer_provider=tracer_provider)
    return CodeAwareVerifier(VerifierClient(channel), VerifierClient(code_channel)), [channel, code_channel]


class SolverClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = solver_pb2_grpc.SolverServiceStub(channel)

    async def solve(self, request: SolveRequest) -> AsyncIterator[Progress | SolveResult]:
        call = self._stub.Solve(convert.solve_request_to_proto(request), timeout=remaining_timeout())
        try:
            async for message in call:
                if message.HasField("progress"):
                    yield convert.progress_from_proto(message.progress)
                else:
                    yield convert.result_from_proto(message.result)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "solver") from None
        finally:
            call.cancel()


async def wait_serving(address: str, timeout: float) -> None:
    """Poll a server's overall health until it is SERVING; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{address} did not become SERVING within {timeout:.0f}s")
