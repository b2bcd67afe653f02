"""Ports that call a peer's core directly, for services running in one process.

When one ``rmesh serve`` runs all three services (``make run``), the router and the solver reach
the solver and the verifier through these instead of loopback gRPC (``RMESH_COLOCATED_CALLS=0``
keeps loopback gRPC). Every
service still serves its gRPC port (health, other callers); only the internal hops go. Each
call gets a span from the callee's tracer, so a trace still shows router, solver and verifier.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from rmesh import metrics
from rmesh.domain import Candidate, Precheck, TaskSpec, Verdict
from rmesh.grpc_edge import DEADLINE, error_from_peer
from rmesh.solver_svc.core import SolverCore
from rmesh.solving import Progress, SolveRequest, SolveResult
from rmesh.verifier_svc.core import LEARNED_NONE, VerifierCore


class InProcessVerifier:
    def __init__(self, core: VerifierCore, tracer: trace.Tracer) -> None:
        self.core = core
        self.tracer = tracer

    async def precheck(self, task: TaskSpec, evidence: Mapping[str, str], required: Sequence[str]) -> Precheck:
        with self.tracer.start_as_current_span("rmesh.api.verifier.v1.VerifierService/Precheck (in process)"):
            try:
                if self.core.blocking(task):
                    return await asyncio.to_thread(self.core.precheck, task, evidence, required)
                return self.core.precheck(task, evidence, required)
            except Exception as exc:
                raise error_from_peer(exc, "verifier") from None

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
        with self.tracer.start_as_current_span("rmesh.api.verifier.v1.VerifierService/Verify (in process)"):
            try:
                verdicts, _ = await self.core.verify_scored(
                    task, evidence, required, candidates, problem=problem, learned=learned or LEARNED_NONE,
                    aggregation=aggregation, deadline=DEADLINE.get(),
                )
            except Exception as exc:
                raise error_from_peer(exc, "verifier") from None
            return verdicts


class InProcessSolver:
    def __init__(self, core: SolverCore, tracer: trace.Tracer) -> None:
        self.core = core
        self.tracer = tracer

    async def solve(self, request: SolveRequest) -> AsyncIterator[Progress | SolveResult]:
        queue: asyncio.Queue[Progress | None] = asyncio.Queue()
        # The search runs in its own task under this span; the caller's context is left alone
        # (an async generator must not hold a context attached across its yields).
        span = self.tracer.start_span("rmesh.api.solver.v1.SolverService/Solve (in process)")

        async def emit(progress: Progress) -> None:
            await queue.put(progress)

        async def search() -> SolveResult:
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                return await self.core.solve(request, emit, DEADLINE.get())
            finally:
                otel_context.detach(token)
                await queue.put(None)

        task = asyncio.create_task(search())
        try:
            while (progress := await queue.get()) is not None:
                yield progress
            result = await task
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise error_from_peer(exc, "solver") from None
        finally:
            task.cancel()
            span.end()
        metrics.STRATEGY_RUNS.labels(strategy=result.strategy, stop_reason=result.stop_reason).inc()
        yield result
