"""`rmesh eval`: bad arguments, the summary and goal arithmetic, and one small run through a real mesh."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from rmesh.mesh.evaluation import Row, goals, oracle_router, summarise

RMESH = str(Path(sys.executable).parent / "rmesh")


async def _rmesh(*args: str, timeout: float = 240) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        RMESH, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, output.decode()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--datasets", "sudoku/9x9"], "unknown dataset 'sudoku/9x9'"),
        (["--size", "0"], "--size must be at least 1, got 0"),
        (["--policies", "best_of_99"], "unknown policy 'best_of_99'"),
        (["--router", "127.0.0.1:9", "--size", "1", "--datasets", "chain_sum/1-digit"], "cannot reach the mesh's router at 127.0.0.1:9"),
    ],
)
async def test_bad_arguments_exit_non_zero_and_say_why(args, message, tmp_path):
    code, output = await _rmesh("eval", "--out", str(tmp_path / "eval.json"), *args)
    assert code != 0
    assert message in output
    assert not (tmp_path / "eval.json").exists()


def _row(policy: str, task: str, correct: bool, tokens: int) -> Row:
    return Row(policy, task, "easy", correct, correct, False, tokens, 0, 1.0)


def test_goals_compare_adaptive_with_the_most_accurate_fixed_policy():
    rows = (
        [_row("best_of_8", "a", i < 2, 600) for i in range(4)]
        + [_row("single_pass", "a", False, 70) for _ in range(4)]
        + [_row("adaptive", "a", i < 2, 180) for i in range(4)]
    )
    result = goals(summarise(rows))
    assert result["best_fixed_policy"] == "best_of_8"
    assert result["accuracy_gap_points"] == 0.0
    assert result["adaptive_token_share_of_best_of_8"] == pytest.approx(0.3)
    assert result["met_at_least_best_of_8_accuracy_with_at_most_60_percent_tokens"] is True
    worse = goals(summarise(rows[:8] + [_row("adaptive", "a", i < 1, 180) for i in range(4)]))
    assert worse["adaptive_accuracy_at_least_best_of_8"] is False
    assert worse["met_at_least_best_of_8_accuracy_with_at_most_60_percent_tokens"] is False


def test_oracle_router_takes_the_cheapest_best_policy_per_kind_and_skips_unsolved_kinds():
    rows = (
        [_row("best_of_8", "easy", i < 2, 600) for i in range(4)]
        + [_row("beam", "easy", i < 2, 400) for i in range(4)]
        + [_row("best_of_8", "hopeless", False, 600) for _ in range(4)]
        + [_row("beam", "hopeless", False, 400) for _ in range(4)]
    )
    oracle = oracle_router(summarise(rows), best_tokens=600)
    # "easy": beam reaches best_of_8's 0.5 for 400 tokens; "hopeless" costs the oracle nothing.
    assert oracle == {"accuracy": 0.25, "generated_tokens_mean": 200.0, "token_share_of_best_fixed": 0.3333}


async def test_a_small_run_through_a_real_mesh_writes_the_report_and_plot(tmp_path):
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    code, output = await _rmesh(
        "eval", "--size", "1", "--datasets", "chain_sum/1-digit", "--policies", "single_pass,adaptive",
        "--out", str(out), "--plot", str(plot),
    )
    assert code == 0, output
    report = json.loads(out.read_text())
    assert set(report["policies"]) == {"single_pass", "adaptive"}
    single = report["policies"]["single_pass"]["overall"]
    assert single["tasks"] == 1 and single["generated_tokens_mean"] > 0
    assert report["goals"]["best_fixed_policy"] == "single_pass"
    assert plot.stat().st_size > 0
