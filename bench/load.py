"""Load generator, run in its own process: keep N Solve streams open against a router for a
while and print one JSON line with what every request got.

    python -m bench.load --router 127.0.0.1:50051 --key bench-key --streams 64 --seconds 60

Each stream sends its next request as soon as the previous one ends. A request either ends with
an outcome event or with a gRPC status; both are counted, by outcome kind and by status code.
A request that takes longer than ``--timeout`` counts as a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter

import grpc

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc


def request(kind: str) -> router_pb2.SolveRequest:
    message = router_pb2.SolveRequest(problem="What is 2 + 3?")
    message.task.kind = kind
    message.task.checks.add(name="arithmetic").params.update({"expression": "2 + 3"})
    return message


async def run(router: str, key: str, streams: int, seconds: float, kind: str, timeout: float) -> dict:
    results: Counter = Counter()
    latencies: list[float] = []
    hangs = 0
    stop_at = time.monotonic() + seconds
    metadata = [("authorization", f"Bearer {key}")]

    async def worker(stub) -> None:
        nonlocal hangs
        while time.monotonic() < stop_at:
            started = time.monotonic()
            outcome = None
            try:
                async for event in stub.Solve(request(kind), metadata=metadata, timeout=timeout):
                    if event.WhichOneof("event") == "outcome":
                        outcome = event.outcome
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    hangs += 1
                results[f"status:{exc.code().name}"] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.05)  # a well-behaved caller backs off
                continue
            if outcome is None:
                results["no_outcome"] += 1
                continue
            results[f"outcome:{router_pb2.OutcomeKind.Name(outcome.kind)}"] += 1
            latencies.append(time.monotonic() - started)

    began = time.monotonic()
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        await asyncio.gather(*(worker(stub) for _ in range(streams)))
    elapsed = time.monotonic() - began
    latencies.sort()
    total = sum(results.values())
    outcomes = sum(v for k, v in results.items() if k.startswith("outcome:"))
    return {
        "streams": streams,
        "seconds": round(elapsed, 1),
        "requests": total,
        "requests_per_second": round(total / elapsed, 2),
        "outcomes_per_second": round(outcomes / elapsed, 2),
        "breakdown": dict(sorted(results.items())),
        "hangs": hangs,
        "unknown_status": results.get("status:UNKNOWN", 0),
        "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", required=True)
    parser.add_argument("--key", default="bench-key")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--kind", default="best_of_n", help="task kind; the bench tenant routes it to that strategy")
    parser.add_argument("--timeout", type=float, default=120, help="a request slower than this is a hang")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.router, args.key, args.streams, args.seconds, args.kind, args.timeout))))


if __name__ == "__main__":
    main()
