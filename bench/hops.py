"""Where a Solve's time goes in the three-process layout. Writes bench/out/hops.json.

The router, the solver and the verifier run as the Helm chart deploys them (one process each,
the instant engine, auth and tracing to a real collector, as ``bench.mesh`` starts them), each
with timers around its gRPC clients' calls and its servicer's handlers. Solves are sent one at a
time; for every internal call the report gives the caller's p50 (from sending the request to the
last message), the callee handler's p50, and the difference: what the call itself costs
(serialisation, interceptors, the hop, waking the other process), beside a bare grpc.aio call
between two processes (``bench.chain``'s Check) measured in the same run.

``python -m bench.hops`` (about a minute). ``--serve SERVICE`` is how it starts each service.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import inspect
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMES_ENV = "RMESH_BENCH_HOPS_OUT"


def _timed(owner, name: str, label: str, times: dict[str, list[float]]) -> None:
    """Wrap ``owner.name`` (a coroutine function or an async generator function) with a timer."""
    inner = getattr(owner, name)
    if inspect.isasyncgenfunction(inner):

        @functools.wraps(inner)
        async def streaming(*args, **kwargs):
            started = time.perf_counter()
            async for message in inner(*args, **kwargs):
                yield message
            times[label].append(time.perf_counter() - started)

        setattr(owner, name, streaming)
    else:

        @functools.wraps(inner)
        async def unary(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await inner(*args, **kwargs)
            finally:
                times[label].append(time.perf_counter() - started)

        setattr(owner, name, unary)


def serve(service: str) -> int:
    """``rmesh serve SERVICE`` with timers on its calls out and its handlers; the medians go to
    the file named by RMESH_BENCH_HOPS_OUT when it exits."""
    from rmesh import peers
    from rmesh.mesh.cli import main
    from rmesh.router_svc.servicer import RouterServicer
    from rmesh.solver_svc.servicer import SolverServicer
    from rmesh.verifier_svc.servicer import VerifierServicer

    times: dict[str, list[float]] = defaultdict(list)
    for owner, name, label in (
        (peers.VerifierClient, "precheck", "calls Precheck"),
        (peers.VerifierClient, "verify", "calls Verify"),
        (peers.SolverClient, "solve", "calls Solve"),
        (RouterServicer, "Solve", "handles Solve"),
        (SolverServicer, "Solve", "handles Solve"),
        (VerifierServicer, "Precheck", "handles Precheck"),
        (VerifierServicer, "Verify", "handles Verify"),
    ):
        _timed(owner, name, label, times)

    def report() -> None:
        medians = {label: {"p50_ms": round(1000 * statistics.median(v), 3), "n": len(v)} for label, v in times.items() if v}
        pathlib.Path(os.environ[TIMES_ENV]).write_text(json.dumps(medians))

    atexit.register(report)
    return main(["serve", service])


async def measure(requests: int) -> dict:
    import grpc
    import rotel

    from bench import mesh as bench_mesh
    from bench.chain import CHECK_PATH
    from bench.load import request as solve_request
    from rmesh.api.router.v1 import router_pb2_grpc

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rmesh-bench-hops-"))
    procs = bench_mesh.Processes(workdir)
    try:
        collector = bench_mesh.free_port()
        procs.start("collector", [
            str(pathlib.Path(rotel.__file__).parent / "rotel-agent"), "start", "--otlp-grpc-endpoint", f"127.0.0.1:{collector}",
            "--otlp-http-endpoint", f"127.0.0.1:{bench_mesh.free_port()}", "--exporter", "blackhole",
        ])
        await bench_mesh.wait_port(collector)
        env, router = bench_mesh.mesh_env("instant", workdir, f"http://127.0.0.1:{collector}")
        for service in ("verifier", "solver", "router"):
            procs.start(service, [sys.executable, "-m", "bench.hops", "--serve", service], {**env, TIMES_ENV: str(workdir / f"{service}.json")})
        check_port = bench_mesh.free_port()
        procs.start("bare", [sys.executable, "-m", "bench.chain", "--port", str(check_port)])
        await bench_mesh.wait_port(check_port)
        for service in ("verifier", "solver", "router"):
            await bench_mesh.wait_serving(env[f"RMESH_{service.upper()}_ADDR"], 180)
        message = solve_request("best_of_n")
        whole: list[float] = []
        bare: list[float] = []
        async with grpc.aio.insecure_channel(router) as channel, grpc.aio.insecure_channel(f"127.0.0.1:{check_port}") as check_channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            check = check_channel.unary_unary(CHECK_PATH)
            for index in range(requests + 20):  # the first 20 warm the path
                started = time.perf_counter()
                async for _event in stub.Solve(message, metadata=bench_mesh.KEY, timeout=30):
                    pass
                took = time.perf_counter() - started
                started = time.perf_counter()
                await check(b"go")
                if index >= 20:
                    whole.append(took)
                    bare.append(time.perf_counter() - started)
        procs.stop("router", "solver", "verifier")
        per_service = {s: json.loads((workdir / f"{s}.json").read_text()) for s in ("router", "solver", "verifier")}
    finally:
        procs.stop()

    def p50(service: str, label: str) -> float:
        return per_service[service][label]["p50_ms"]

    calls = {
        "router to verifier, Precheck": ("router", "calls Precheck", "verifier", "handles Precheck"),
        "router to solver, Solve": ("router", "calls Solve", "solver", "handles Solve"),
        "router to verifier, Verify (the release gate)": ("router", "calls Verify", "verifier", "handles Verify"),
        "solver to verifier, Verify (each round)": ("solver", "calls Verify", "verifier", "handles Verify"),
    }
    rows = {}
    for name, (caller, call, callee, handler) in calls.items():
        rows[name] = {
            "caller_p50_ms": p50(caller, call),
            "handler_p50_ms": p50(callee, handler),
            "call_itself_ms": round(p50(caller, call) - p50(callee, handler), 3),
        }
    return {
        "requests": requests,
        "solve_p50_ms": round(1000 * statistics.median(whole), 3),
        "router_handles_solve_p50_ms": p50("router", "handles Solve"),
        "bare_grpc_call_p50_ms": round(1000 * statistics.median(bare), 3),
        "calls": rows,
        "per_service": per_service,
        "note": "the verifier's Verify handler p50 is over both callers' calls",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=("router", "solver", "verifier"), help="start this service with timers (internal)")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    if args.serve:
        sys.exit(serve(args.serve))
    from bench.common import machine, write

    result = asyncio.run(measure(args.requests))
    result["machine"] = machine()
    write("hops.json", result)
    for name, row in result["calls"].items():
        print(f"{name}: caller {row['caller_p50_ms']} ms, handler {row['handler_p50_ms']} ms, the call itself {row['call_itself_ms']} ms")
    print(f"a Solve {result['solve_p50_ms']} ms; a bare grpc.aio call {result['bare_grpc_call_p50_ms']} ms")


if __name__ == "__main__":
    main()
