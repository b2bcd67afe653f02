"""``rmesh eval``: run a reasoning-gym task mix through the real gRPC mesh as a black-box client
and compare fixed policies with the adaptive one.

The adaptive policy is what ships: the arithmetic route of ``policy/tenants/demo.yaml``, read
as shipped and reached with the demo key, starting from an empty prior. The fixed policies are
tenants of ``policy/eval/`` with one strategy each. Tasks are generated offline by
reasoning-gym at several difficulties, each with the exact checker that fits it, and sent with
the kinds interleaved; reasoning-gym's own scorers grade what the mesh released and never reach
the verifier.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc

from rmesh import peers
from rmesh.api.router.v1 import router_pb2, router_pb2_grpc

# A development tool: it runs from a checkout and uses the repository's tenant files.
ROOT = pathlib.Path(__file__).resolve().parents[4]
POLICIES = {  # name -> (tenant file, its public key)
    "single_pass": ("policy/eval/eval-single-pass.yaml", "eval-single-pass"),
    "best_of_8": ("policy/eval/eval-best-of-8.yaml", "eval-best-of-8"),
    "beam": ("policy/eval/eval-beam.yaml", "eval-beam"),
    "adaptive": ("policy/tenants/demo.yaml", "demo-key"),  # the shipped route, as shipped
}
DEFAULT_POLICIES = ("single_pass", "best_of_8", "adaptive")
# The goal: the adaptive route at least as accurate as fixed Best-of-8, on at most this share
# of its generated tokens.
TOKEN_SHARE_GOAL = 0.60


@dataclass(frozen=True)
class Spec:
    dataset: str
    label: str  # difficulty label, part of the task kind the router's prior learns on
    params: dict


SPECS = {
    "basic_arithmetic/1-digit": Spec("basic_arithmetic", "easy", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1)),
    "basic_arithmetic/2-digit": Spec("basic_arithmetic", "medium", dict(min_terms=2, max_terms=4, min_digits=2, max_digits=2)),
    "basic_arithmetic/3-digit": Spec("basic_arithmetic", "hard", dict(min_terms=3, max_terms=4, min_digits=3, max_digits=3)),
    "chain_sum/1-digit": Spec("chain_sum", "easy", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1)),
    "countdown/3-numbers": Spec("countdown", "medium", dict(min_numbers=3, max_numbers=3, min_value=1, max_value=10, min_target=5, max_target=30)),
    "countdown/5-numbers": Spec("countdown", "hard", dict(min_numbers=5, max_numbers=5, min_value=1, max_value=20, min_target=20, max_target=100)),
}


class EvalError(Exception):
    """Bad arguments or an unreachable mesh: said plainly, exit non-zero."""


@dataclass
class Task:
    name: str
    label: str
    entry: dict
    dataset: object
    request: router_pb2.SolveRequest


@dataclass
class Row:
    policy: str
    task: str
    label: str
    correct: bool
    released: bool
    escalated: bool
    completion_tokens: int
    cached_tokens: int
    seconds: float
    outcome: str = ""
    extra: dict = field(default_factory=dict)


def build_tasks(names: list[str], size: int, seed: int) -> list[Task]:
    import reasoning_gym

    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise EvalError(f"unknown dataset {unknown[0]!r}; known: {', '.join(SPECS)}")
    if size < 1:
        raise EvalError(f"--size must be at least 1, got {size}")
    tasks = []
    for name in names:
        spec = SPECS[name]
        dataset = reasoning_gym.create_dataset(spec.dataset, size=size, seed=seed, **spec.params)
        for entry in dataset:
            meta = entry["metadata"]
            request = router_pb2.SolveRequest()
            request.task.kind = name
            if spec.dataset == "countdown":
                numbers = ", ".join(str(n) for n in meta["numbers"])
                request.problem = f"Make {meta['target']} using each of the numbers {numbers} exactly once."
                check = request.task.checks.add(name="expression_target")
                check.params.update({"numbers": meta["numbers"], "target": meta["target"], "use_all": True})
            else:
                request.problem = f"What is {meta['expression']}?"
                request.task.checks.add(name="arithmetic").params.update({"expression": meta["expression"]})
            tasks.append(Task(name, spec.label, entry, dataset, request))
    random.Random(seed).shuffle(tasks)
    return tasks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_serving(address: str, timeout: float) -> None:
    try:
        await peers.wait_serving(address, timeout)
    except TimeoutError:
        raise EvalError(f"cannot reach the mesh's router at {address} (no SERVING health within {timeout:.0f}s)") from None


def start_mesh(workdir: str) -> tuple[subprocess.Popen, str]:
    """``rmesh serve`` on the policies' tenant files, each copied byte for byte."""
    tenants = pathlib.Path(workdir) / "tenants"
    tenants.mkdir()
    for file, _ in POLICIES.values():
        shutil.copyfile(ROOT / file, tenants / pathlib.Path(file).name)
    ports = {name: _free_port() for name in ("ROUTER", "SOLVER", "VERIFIER")}
    env = {
        **os.environ,
        **{f"RMESH_{name}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()},
        "RMESH_TENANTS_DIR": str(tenants),
        "RMESH_REVIEW_DB": str(pathlib.Path(workdir) / "reviews.sqlite3"),
    }
    process = subprocess.Popen(
        [str(pathlib.Path(sys.executable).parent / "rmesh"), "serve"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return process, f"127.0.0.1:{ports['ROUTER']}"


def progress_bar(done: int, total: int, note: str) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {note:<40.40}")
    sys.stderr.flush()


async def solve_one(stub, policy: str, task: Task, timeout: float) -> Row:
    _, key = POLICIES[policy]
    started = time.monotonic()
    escalated = False
    outcome = None
    try:
        async for event in stub.Solve(task.request, metadata=[("authorization", f"Bearer {key}")], timeout=timeout):
            kind = event.WhichOneof("event")
            if kind == "progress" and event.progress.stage.startswith("escalate"):
                escalated = True
            elif kind == "outcome":
                outcome = event.outcome
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE,):
            raise EvalError(f"the mesh went away: {exc.details()}") from None
        return Row(policy, task.name, task.label, False, False, escalated, 0, 0, time.monotonic() - started, exc.code().name)
    seconds = time.monotonic() - started
    released = bool(outcome and outcome.released)
    correct = released and task.dataset.score_answer(outcome.answer, task.entry) == 1.0
    return Row(
        policy, task.name, task.label, correct, released, escalated,
        int(outcome.usage.completion_tokens), int(outcome.usage.cached_tokens), seconds,
        router_pb2.OutcomeKind.Name(outcome.kind),
    )


def summarise(rows: list[Row]) -> dict:
    def stats(group: list[Row]) -> dict:
        walls = sorted(r.seconds for r in group)
        return {
            "tasks": len(group),
            "accuracy": round(sum(r.correct for r in group) / len(group), 4),
            "released": round(sum(r.released for r in group) / len(group), 4),
            "generated_tokens_mean": round(statistics.mean(r.completion_tokens for r in group), 1),
            "generated_tokens_total": sum(r.completion_tokens for r in group),
            "cached_tokens_mean": round(statistics.mean(r.cached_tokens for r in group), 1),
            "wall_seconds_p50": round(statistics.median(walls), 3),
            "wall_seconds_p95": round(walls[min(len(walls) - 1, int(0.95 * len(walls)))], 3),
            "escalated_share": round(sum(r.escalated for r in group) / len(group), 4),
        }

    report: dict = {}
    for policy in dict.fromkeys(r.policy for r in rows):
        mine = [r for r in rows if r.policy == policy]
        report[policy] = {"overall": stats(mine), "by_task": {}}
        for name in dict.fromkeys(r.task for r in mine):
            report[policy]["by_task"][name] = stats([r for r in mine if r.task == name])
    return report


def goals(report: dict) -> dict:
    """Adaptive against fixed Best-of-8 (accuracy at least equal, at most TOKEN_SHARE_GOAL of
    its generated tokens), and against the most accurate fixed policy, with the oracle router
    beside them."""
    if "adaptive" not in report:
        return {}
    adaptive = report["adaptive"]["overall"]
    fixed = {p: v["overall"] for p, v in report.items() if p != "adaptive"}
    if not fixed:
        return {}
    best = max(fixed, key=lambda p: fixed[p]["accuracy"])
    best_tokens = fixed[best]["generated_tokens_mean"]
    out: dict = {
        "oracle_router": oracle_router(report, best_tokens),
        "best_fixed_policy": best,
        "accuracy_gap_points": round(100 * (fixed[best]["accuracy"] - adaptive["accuracy"]), 2),
        "adaptive_token_share_of_best_fixed": round(adaptive["generated_tokens_mean"] / best_tokens, 4) if best_tokens else 0.0,
    }
    if "best_of_8" in fixed:
        bo8 = fixed["best_of_8"]
        share = adaptive["generated_tokens_mean"] / bo8["generated_tokens_mean"] if bo8["generated_tokens_mean"] else 0.0
        out["adaptive_token_share_of_best_of_8"] = round(share, 4)
        out["adaptive_accuracy_at_least_best_of_8"] = adaptive["accuracy"] >= bo8["accuracy"]
        out[f"met_at_least_best_of_8_accuracy_with_at_most_{int(TOKEN_SHARE_GOAL * 100)}_percent_tokens"] = (
            adaptive["accuracy"] >= bo8["accuracy"] and share <= TOKEN_SHARE_GOAL
        )
    return out


def oracle_router(report: dict, best_tokens: float) -> dict:
    """What a router that knew each kind's results in advance would get from the fixed policies.

    Per task kind it picks the cheapest fixed policy with that kind's best accuracy, and spends
    nothing on a kind no fixed policy solved (a free, perfect give-up). Adaptive routing chooses
    among the same strategies without that knowledge, so this bounds the token share it can
    reach at the fixed policies' accuracy.
    """
    fixed = {p: v["by_task"] for p, v in report.items() if p != "adaptive"}
    kinds = dict.fromkeys(k for by_task in fixed.values() for k in by_task)
    tasks = correct = tokens = 0.0
    for kind in kinds:
        rows = [by_task[kind] for by_task in fixed.values() if kind in by_task]
        top = max(r["accuracy"] for r in rows)
        pick = min((r for r in rows if r["accuracy"] == top), key=lambda r: r["generated_tokens_mean"])
        tasks += pick["tasks"]
        correct += top * pick["tasks"]
        tokens += pick["generated_tokens_mean"] * pick["tasks"] if top > 0 else 0.0
    mean_tokens = tokens / tasks if tasks else 0.0
    return {
        "accuracy": round(correct / tasks, 4) if tasks else 0.0,
        "generated_tokens_mean": round(mean_tokens, 1),
        "token_share_of_best_fixed": round(mean_tokens / best_tokens, 4) if best_tokens else 0.0,
    }


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    markers = {"single_pass": "o", "best_of_8": "s", "beam": "^", "adaptive": "*"}
    for policy, data in report.items():
        xs = [v["generated_tokens_mean"] for v in data["by_task"].values()]
        ys = [v["accuracy"] for v in data["by_task"].values()]
        axis.scatter(xs, ys, label=policy, marker=markers.get(policy, "o"), s=80 if policy == "adaptive" else 40)
        for (name, v) in data["by_task"].items():
            axis.annotate(name.split("/")[0][:5] + "/" + name.split("/")[1][:2], (v["generated_tokens_mean"], v["accuracy"]), fontsize=6, alpha=0.6)
    axis.set_xlabel("generated tokens per request (mean)")
    axis.set_ylabel("accuracy (reasoning-gym scorer)")
    axis.set_title("Reasoning Mesh on Gemma 3 270M: accuracy against compute")
    axis.legend()
    axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


async def run(
    datasets: list[str], size: int, policies: list[str], router: str | None, seed: int, out: str, plot_path: str, timeout: float
) -> dict:
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise EvalError(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}")
    tasks = build_tasks(datasets, size, seed)
    workdir = tempfile.mkdtemp(prefix="rmesh-eval-")
    process = None
    if router is None:
        process, router = start_mesh(workdir)
    try:
        await wait_serving(router, 90 if process else 5)
        rows: list[Row] = []
        total = len(tasks) * len(policies)
        started = time.monotonic()
        async with grpc.aio.insecure_channel(router) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            for policy in policies:
                for task in tasks:
                    rows.append(await solve_one(stub, policy, task, timeout))
                    progress_bar(len(rows), total, f"{policy} {task.name}")
        sys.stderr.write("\n")
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    report = summarise(rows)
    payload = {
        "command": "rmesh eval " + " ".join(sys.argv[2:]),
        "datasets": datasets,
        "size_per_dataset": size,
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
        "policies": report,
        "goals": goals(report),
    }
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(json.dumps(payload, indent=2) + "\n")
    plot(report, pathlib.Path(plot_path))
    return payload
