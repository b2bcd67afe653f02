"""Thin gRPC servicer over SolverCore: progress messages while searching, then the result."""

from __future__ import annotations

import asyncio

import grpc

from rmesh import convert, metrics
from rmesh.api.solver.v1 import solver_pb2, solver_pb2_grpc
from rmesh.errors import MeshError
from rmesh.grpc_edge import abort, abort_internal, begin_call
from rmesh.solver_svc.core import SolverCore
from rmesh.solving import Progress

SERVICE_NAME = solver_pb2.DESCRIPTOR.services_by_name["SolverService"].full_name


class SolverServicer(solver_pb2_grpc.SolverServiceServicer):
    def __init__(self, core: SolverCore) -> None:
        self.core = core

    async def Solve(self, request, context: grpc.aio.ServicerContext):
        # An async generator (not context.write) so tracing interceptors see a stream.
        deadline = begin_call(context)
        queue: asyncio.Queue[Progress | None] = asyncio.Queue()

        async def emit(progress: Progress) -> None:
            await queue.put(progress)

        async def search():
            try:
                return await self.core.solve(convert.solve_request_from_proto(request), emit, deadline)
            finally:
                await queue.put(None)

        task = asyncio.create_task(search())
        try:
            while (progress := await queue.get()) is not None:
                yield solver_pb2.SolveResponse(progress=convert.progress_to_proto(progress))
            result = await task
        except MeshError as exc:
            await abort(context, exc)
        except Exception as exc:
            await abort_internal(context, exc)
        finally:
            task.cancel()
        metrics.STRATEGY_RUNS.labels(strategy=result.strategy, stop_reason=result.stop_reason).inc()
        yield solver_pb2.SolveResponse(result=convert.result_to_proto(result))


def add_to_server(servicer: SolverServicer, server: grpc.aio.Server) -> list[str]:
    solver_pb2_grpc.add_SolverServiceServicer_to_server(servicer, server)
    return [SERVICE_NAME]
