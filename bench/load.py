"""Load generator, run in its own process: keep N Solve streams open against a router for a
while and print one JSON line with what every request got.

    python -m bench.load --router 127.0.0.1:50051 --key bench-key --streams 64 --seconds 60

Each stream sends its next request as soon as the previous one ends. A request either ends with
an outcome event or with a gRPC status; both are counted, by outcome kind and by status code.
A request that takes longer than ``--timeout`` counts as a hang. With ``--distinct`` every
request asks a different sum (a fixed sequence, so runs compare), so requests neither pass nor
fail together and each samples its own branches (the solver seeds from the problem).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter

import grpc

from rmesh.api.router.v1 import router_pb2, router_pb2_grpc


def request(kind: str, left: int = 2, right: int = 3) -> router_pb2.SolveRequest:
    message = router_pb2.SolveRequest(problem=f"What is {left} + {right}?")
    message.task.kind = kind
    message.task.checks.add(name="arithmetic").params.update({"expression": f"{left} + {right}"})
    return message


def sums(seed: int = 7):
    """Two-digit sums in a fixed order, the same every run; no sum repeats until all 8100 have
    been asked."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    while True:
        if len(seen) == 90 * 90:
            seen.clear()
        pair = (rng.randint(10, 99), rng.randint(10, 99))
        if pair not in seen:
            seen.add(pair)
            yield pair


async def run(
    router: str, key: str, streams: int, seconds: float, kind: str, timeout: float, distinct: bool = False
) -> dict:
    results: Counter = Counter()
    latencies: list[float] = []
    hangs = 0
    stop_at = time.monotonic() + seconds
    metadata = [("authorization", f"Bearer {key}")]
    problems = sums()

    async def worker(stub) -> None:
        nonlocal hangs
        while time.monotonic() < stop_at:
            started = time.monotonic()
            outcome = None
            message = request(kind, *next(problems)) if distinct else request(kind)
            try:
                async for event in stub.Solve(message, metadata=metadata, timeout=timeout):
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
        "problems": "distinct two-digit sums" if distinct else "one fixed sum, 2 + 3",
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
    parser.add_argument("--distinct", action="store_true", help="a different sum in every request (default: 2 + 3 in all)")
    args = parser.parse_args()
    result = asyncio.run(run(args.router, args.key, args.streams, args.seconds, args.kind, args.timeout, args.distinct))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
