"""What the mesh itself costs, and how it holds up under load. Writes bench/out/mesh.json.

- overhead: the same streaming call through a bare chain of three grpc.aio processes
  (bench/chain.py: no auth, no policy, no tracing) and through the mesh with auth, policy and
  tracing on (spans go to a real OTLP collector, rotel, that drops them) and the instant engine
  (fixed text at once, for benchmarks only): as ``rmesh serve`` (and ``make run``) runs it, all
  three services in one process calling each other in process (``mesh``), and each service in
  its own process calling the others over gRPC, as the Helm chart deploys it
  (``mesh_three_processes``). p50/p99 at concurrency 1 and 16, and ``mesh_overhead_ratio_p50`` =
  mesh p50 / chain p50 (``..._three_processes`` for the other layout). The split layout makes
  five gRPC calls per Solve, so it is also compared with a bare chain that makes the same five
  (``bare_chain_five_calls``: client to A; A to C; A to B; B to C; A to C), as
  ``split_overhead_ratio_p50``; and so is the split layout with tracing turned off
  (``mesh_three_processes_untraced``, OTEL_SDK_DISABLED), to show what tracing every call costs.
- strategies: time to the first event and to the final outcome, separately, for each strategy
  on the embedded engine.
- load: bench/load.py in its own process keeps 64 streams open for 60 s against the instant
  engine (all asking 2 + 3, the one sum its fixed text answers) and 8 against the embedded one
  (a different two-digit sum each request), each on the three-process layout; every request's outcome or status, requests per
  second, each service's peak resident memory (VmHWM), and health afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
import rotel
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.chain import PATH as CHAIN_PATH
from bench.common import machine, write
from bench.load import request as solve_request
from rmesh.api.router.v1 import router_pb2_grpc
from rmesh.peers import wait_serving

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RMESH = str(pathlib.Path(sys.executable).parent / "rmesh")
KEY = [("authorization", "Bearer bench-key")]
ROUNDS = 10  # interleaved slices per overhead measurement
PARTS = ("overhead", "load", "strategies")
STRATEGIES = ("single_pass", "single_path", "best_of_n", "self_consistency", "beam", "mcts")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


class Processes:
    def __init__(self, logdir: pathlib.Path) -> None:
        self.logdir = logdir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.running[name] = process
        return process

    def peak_rss_mib(self, name: str) -> float:
        status = pathlib.Path(f"/proc/{self.running[name].pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return round(kib / 1024, 1)

    def stop(self, *names: str) -> None:
        for name in names or list(self.running):
            process = self.running.pop(name)
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "p50_ms": round(1000 * statistics.median(values), 3),
        "p99_ms": round(1000 * values[min(len(values) - 1, int(0.99 * len(values)))], 3),
        "n": len(values),
    }


async def measure(call, requests: int, concurrency: int) -> tuple[list[float], list[float]]:
    """Run ``requests`` streaming calls, ``concurrency`` at a time: (first event, last event) times."""
    first: list[float] = []
    last: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            seen_first = False
            async for _message in call():
                if not seen_first:
                    first.append(time.perf_counter() - started)
                    seen_first = True
            last.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return first, last


def mesh_env(engine: str, workdir: pathlib.Path, collector: str, name: str = "") -> tuple[dict, str]:
    ports = {name: free_port() for name in ("ROUTER", "SOLVER", "VERIFIER")}
    env = {
        **os.environ,
        **{f"RMESH_{name}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()},
        "RMESH_ENGINE": engine,
        "RMESH_TENANTS_DIR": str(ROOT / "bench" / "tenants"),
        "RMESH_REVIEW_DB": str(workdir / f"reviews-{name or engine}.sqlite3"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        # The split layout's solver and verifier answer only callers with the mesh's token.
        "RMESH_SERVICE_TOKEN": secrets.token_urlsafe(32),
    }
    return env, f"127.0.0.1:{ports['ROUTER']}"


async def start_mesh(
    procs: Processes, engine: str, workdir: pathlib.Path, collector: str, colocated: bool = False, name: str = ""
) -> tuple[str, dict]:
    """The three services in three processes, or all in one (``rmesh serve``, as ``make run``
    starts it: internal calls in process). ``name`` (default: the engine's, ``-colocated`` for one
    process) names its processes and its review database; ``collector`` empty turns tracing off
    (OpenTelemetry's OTEL_SDK_DISABLED)."""
    name = name or (f"{engine}-colocated" if colocated else engine)
    env, router = mesh_env(engine, workdir, collector, name)
    if not collector:
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT")
        env["OTEL_SDK_DISABLED"] = "true"
    if colocated:
        procs.start(name, [RMESH, "serve"], env)
    else:
        for service in ("verifier", "solver", "router"):
            procs.start(f"{name}-{service}", [RMESH, "serve", service], env)
    addresses = {s: env[f"RMESH_{s.upper()}_ADDR"] for s in ("verifier", "solver", "router")}
    for address in addresses.values():
        await wait_serving(address, 180)
    return router, addresses


async def healthy(addresses: dict) -> dict:
    states = {}
    for service, address in addresses.items():
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                states[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            states[service] = exc.code().name
    return states


async def load(router: str, streams: int, seconds: float, kind: str, distinct: bool) -> dict:
    process = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.load", "--router", router, "--streams", str(streams), "--seconds", str(seconds), "--kind", kind,
        *(["--distinct"] if distinct else []), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"bench.load exited with {process.returncode}")
    return json.loads(output.decode().strip().splitlines()[-1])


async def overhead(procs: Processes, workdir: pathlib.Path, collector: str, requests: int) -> dict:
    """The same streaming call through the bare chain, the mesh and the one-process mesh."""
    ports = [free_port() for _ in range(6)]
    hop = [PYTHON, "-m", "bench.chain", "--port"]
    procs.start("chain-c", [*hop, str(ports[2])])
    procs.start("chain-b", [*hop, str(ports[1]), "--next", f"127.0.0.1:{ports[2]}"])
    procs.start("chain-a", [*hop, str(ports[0]), "--next", f"127.0.0.1:{ports[1]}"])
    # The split mesh's five calls: A plays the router, B the solver, C the verifier.
    five_c = f"127.0.0.1:{ports[5]}"
    procs.start("five-c", [*hop, str(ports[5])])
    procs.start("five-b", [*hop, str(ports[4]), "--check", five_c, "--checks-before", "1"])
    procs.start("five-a", [
        *hop, str(ports[3]), "--next", f"127.0.0.1:{ports[4]}", "--check", five_c, "--checks-before", "1", "--checks-after", "1",
    ])
    for port in ports:
        await wait_port(port)
    router, _ = await start_mesh(procs, "instant", workdir, collector, colocated=True)
    split_router, _ = await start_mesh(procs, "instant", workdir, collector)
    untraced_router, _ = await start_mesh(procs, "instant", workdir, "", name="untraced")
    result: dict = {}
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as chain_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{ports[3]}") as five_channel,
        grpc.aio.insecure_channel(router) as channel,
        grpc.aio.insecure_channel(split_router) as split_channel,
        grpc.aio.insecure_channel(untraced_router) as untraced_channel,
    ):
        chain_call = chain_channel.unary_stream(CHAIN_PATH)
        five_call = five_channel.unary_stream(CHAIN_PATH)
        message = solve_request("best_of_n")
        calls = {
            "bare_chain": lambda: chain_call(b"go"),
            "bare_chain_five_calls": lambda: five_call(b"go"),
            "mesh": lambda: router_pb2_grpc.RouterServiceStub(channel).Solve(message, metadata=KEY),
            "mesh_three_processes": lambda: router_pb2_grpc.RouterServiceStub(split_channel).Solve(message, metadata=KEY),
            "mesh_three_processes_untraced": lambda: router_pb2_grpc.RouterServiceStub(untraced_channel).Solve(
                message, metadata=KEY
            ),
        }
        for concurrency in (1, 16):
            n = requests * (4 if concurrency > 1 else 1)
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for name, call in calls.items():
                await measure(call, 20, concurrency)  # warm the path
            # Interleaved slices, so drift in a shared machine's load hits every path alike.
            for _ in range(ROUNDS):
                for name, call in calls.items():
                    samples[name] += (await measure(call, n // ROUNDS, concurrency))[1]
            row: dict = {name: percentiles(values) for name, values in samples.items()}
            chain = row["bare_chain"]
            for name in ("mesh", "mesh_three_processes"):
                suffix = name.removeprefix("mesh")
                row[f"mesh_overhead_ratio_p50{suffix}"] = round(row[name]["p50_ms"] / chain["p50_ms"], 3)
                row[f"mesh_overhead_ratio_p99{suffix}"] = round(row[name]["p99_ms"] / chain["p99_ms"], 3)
            five = row["bare_chain_five_calls"]
            row["split_overhead_ratio_p50"] = round(row["mesh_three_processes"]["p50_ms"] / five["p50_ms"], 3)
            row["split_overhead_ratio_p99"] = round(row["mesh_three_processes"]["p99_ms"] / five["p99_ms"], 3)
            row["split_overhead_ratio_p50_untraced"] = round(row["mesh_three_processes_untraced"]["p50_ms"] / five["p50_ms"], 3)
            result[f"concurrency_{concurrency}"] = row
            print(f"concurrency {concurrency}: " + ", ".join(f"{k} p50 {v['p50_ms']} ms" for k, v in row.items() if isinstance(v, dict)), flush=True)
    procs.stop("chain-a", "chain-b", "chain-c", "five-a", "five-b", "five-c", "instant-colocated", "instant-router", "instant-solver", "instant-verifier",
               "untraced-router", "untraced-solver", "untraced-verifier")
    return result


async def load_run(procs: Processes, workdir: pathlib.Path, collector: str, engine: str, streams: int, seconds: float) -> dict:
    """bench/load.py against a fresh three-process mesh; peak memory and health afterwards."""
    router, addresses = await start_mesh(procs, engine, workdir, collector)
    # The instant engine writes one fixed answer, so only 2 + 3 passes its checks; a model gets
    # a different sum each request, so requests do not pass or fail together.
    result = await load(router, streams, seconds, "best_of_n", distinct=engine != "instant")
    result["peak_rss_mib"] = {s: procs.peak_rss_mib(f"{engine}-{s}") for s in addresses}
    result["health_after"] = await healthy(addresses)
    print(f"{engine} load:", json.dumps(result), flush=True)
    procs.stop(*(f"{engine}-{s}" for s in addresses))
    return result


async def strategies(procs: Processes, workdir: pathlib.Path, collector: str) -> dict:
    """Time to the first event and to the outcome, per strategy, on the embedded engine."""
    router, addresses = await start_mesh(procs, "embedded", workdir, collector)
    result: dict = {}
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for kind in STRATEGIES:
            message = solve_request(kind)
            first, last = await measure(lambda: stub.Solve(message, metadata=KEY, timeout=300), 3, 1)
            result[kind] = {
                "first_event_ms_p50": round(1000 * statistics.median(first), 1),
                "final_outcome_ms_p50": round(1000 * statistics.median(last), 1),
                "runs": len(last),
            }
            print(kind, result[kind], flush=True)
    procs.stop(*(f"embedded-{s}" for s in addresses))
    return result


async def main(load_seconds: float, requests: int, parts: list[str]) -> None:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rmesh-bench-mesh-"))
    procs = Processes(workdir)
    result: dict = {"machine": machine(), "logs": str(workdir)}
    try:
        # Spans go to a real collector; its blackhole exporter keeps the collector's own cost small.
        collector_port = free_port()
        procs.start("collector", [
            str(pathlib.Path(rotel.__file__).parent / "rotel-agent"), "start",
            "--otlp-grpc-endpoint", f"127.0.0.1:{collector_port}",
            "--otlp-http-endpoint", f"127.0.0.1:{free_port()}",
            "--exporter", "blackhole",
        ])
        await wait_port(collector_port)
        collector = f"http://127.0.0.1:{collector_port}"
        if "overhead" in parts:
            rows = result["overhead"] = await overhead(procs, workdir, collector, requests)
            result["goal_mesh_overhead_ratio_p50_at_most_1_3"] = {
                "one_process": all(v["mesh_overhead_ratio_p50"] <= 1.3 for v in rows.values()),
                "three_processes": all(v["mesh_overhead_ratio_p50_three_processes"] <= 1.3 for v in rows.values()),
                "three_processes_against_five_calls": all(v["split_overhead_ratio_p50"] <= 1.3 for v in rows.values()),
            }
        if "load" in parts:
            result["load_instant"] = await load_run(procs, workdir, collector, "instant", 64, load_seconds)
        if "strategies" in parts:
            result["strategies_embedded"] = await strategies(procs, workdir, collector)
        if "load" in parts:
            result["load_embedded"] = await load_run(procs, workdir, collector, "embedded", 8, load_seconds)
    finally:
        procs.stop()
    write("mesh.json", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="mesh overhead, per-strategy latency and load")
    parser.add_argument("--load-seconds", type=float, default=60)
    parser.add_argument("--requests", type=int, default=300, help="requests per overhead measurement at concurrency 1")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all; mesh.json holds what ran)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.load_seconds, args.requests, args.parts))
