"""``rmesh plan`` (the KV capacity table) and the capacity warnings of ``rmesh policy lint``."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest
from sglang_standin import KV_BYTES_PER_TOKEN, FakeSGLang, StandIn

from rmesh.capacity import capacity_rows, route_warnings
from rmesh.domain import Budget, SearchParams

ROOT = pathlib.Path(__file__).resolve().parent.parent
RMESH = str(pathlib.Path(sys.executable).parent / "rmesh")
GiB = 1 << 30


def rmesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RMESH, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_seeds_capacity_plan():
    """80 layers, 8 KV heads, 128 dims, bf16: 320 KiB a token; eight 16k branches are 40 GiB
    unshared, and about 14 GiB when they share a 12k prefix."""
    done = rmesh("plan", "--geometry", "80,8,128,2", "--branches", "8", "--context", "16384", "--prefix", "12288", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["kv_bytes_per_token"] == 327_680
    rows = {row["branches"]: row for row in plan["rows"]}
    assert sorted(rows) == [1, 2, 4, 8]
    assert rows[1]["per_branch"] == 5 * GiB and rows[8]["worst_case"] == 40 * GiB
    assert rows[8]["shared_prefix"] == (12288 + 8 * 4096) * 327_680  # 13.75 GiB


def test_plan_reads_the_packaged_gguf():
    done = rmesh("plan")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first == "Gemma 3 270m: 2 x 18 layers x 1 KV heads x 256 dims x 2 bytes = 18432 bytes (18.0 KiB) of KV per token"


def test_plan_asks_sglang_for_its_kv_cost():
    FakeSGLang.reset()
    standin = StandIn().start()
    try:
        done = rmesh("plan", "--sglang", standin.url, "--json")
        assert done.returncode == 0, done.stderr
        plan = json.loads(done.stdout)
        assert plan["model"] == "google/gemma-3-270m-it"
        assert abs(plan["kv_bytes_per_token"] - KV_BYTES_PER_TOKEN) / KV_BYTES_PER_TOKEN < 0.001
        FakeSGLang.report_memory = False
        done = rmesh("plan", "--sglang", standin.url)
        assert done.returncode == 2 and "does not report its KV pool" in done.stderr
    finally:
        standin.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prefix", "5000"], "--prefix 5000 is longer than --context 4096"),
        (["--branches", "0"], "--branches must be from 1"),
        (["--geometry", "80,8,x,2"], "--geometry '80,8,x,2' is not four positive integers"),
        (["--gguf", "/no/such.gguf"], "/no/such.gguf: no such GGUF file"),
    ],
)
def test_plan_refuses_bad_arguments_saying_which(args, message):
    done = rmesh("plan", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_route_warnings_name_what_does_not_fit():
    budget = Budget(max_tokens=2400, max_branches=8, max_depth=4, wall_clock_seconds=60, max_tokens_per_branch=150)
    beam = route_warnings(["beam"], budget, SearchParams(beam_width=2, branching_factor=3), engine_tokens=4096, bytes_per_token=18432)
    assert beam == ["beam: reaching max_depth 4 takes 21 branches; max_branches 8 stops it earlier"]
    small = route_warnings(["best_of_n"], budget, SearchParams(), engine_tokens=400, bytes_per_token=18432)
    assert small and "one branch needs about 500 tokens" in small[0]
    assert route_warnings(["best_of_n"], budget, SearchParams(), engine_tokens=4096, bytes_per_token=18432) == []
    assert capacity_rows(2, [1, 3], 10, 4)[1].shared_prefix == (4 + 3 * 6) * 2


def test_the_shipped_tenants_fit_the_embedded_default(tmp_path):
    done = rmesh("policy", "lint", "policy/tenants")
    assert done.returncode == 0 and "WARN" not in done.stdout, done.stdout


def test_lint_warns_with_file_line_and_route(tmp_path):
    tenant = tmp_path / "narrow.yaml"
    tenant.write_text(textwrap.dedent("""\
        tenant: narrow
        api_keys:
          - {name: c, sha256: c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c, role: caller}
        routes:
          - name: cheap
            when: request.problem_chars < 20
            difficulty: easy
            strategies: [best_of_n]
            budget: {max_tokens: 400, max_branches: 4, max_depth: 2, wall_clock_seconds: 30, max_tokens_per_branch: 100}
          - name: deep
            difficulty: hard
            strategies: [best_of_n, beam]
            budget: {max_tokens: 1200, max_branches: 8, max_depth: 4, wall_clock_seconds: 60, max_tokens_per_branch: 150}
        """))
    done = rmesh("policy", "lint", str(tenant))
    assert done.returncode == 0  # a warning, not a failure
    warnings = [line for line in done.stdout.splitlines() if line.startswith("WARN")]
    assert warnings == [f"WARN {tenant}:10: routes.deep: beam: reaching max_depth 4 takes 21 branches; max_branches 8 stops it earlier"]
    small = rmesh("policy", "lint", "--engine-tokens", "512", str(tenant))
    assert f"WARN {tenant}:10: routes.deep: beam: one branch needs about 950 tokens" in small.stdout
    assert f"{tenant}:5: routes.cheap" not in small.stdout  # 350 + 100 fits 512
