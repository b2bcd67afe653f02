"""Learned scorers: aggregation, calibration maths, the judge on the real model, the SGLang
reward-model contract, and how learned scores may and may not affect release."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from conftest import SETTINGS, inner_channel
from rmesh.api.verifier.v1 import verifier_pb2, verifier_pb2_grpc
from rmesh.config import ServerSettings
from rmesh.domain import Candidate, Checkpoint, CheckSpec, TaskSpec
from rmesh.errors import InvalidRequest
from rmesh.verifier_svc.serve import start_verifier
from rmesh.telemetry import tracer_provider
from rmesh.mesh.calibrate import auroc, best_of_n_curve, expected_calibration_error, fit_threshold, largest_supported_n, Labelled
from rmesh.verifier_svc.core import VerifierCore
from rmesh.verifier_svc.scorers import Calibration, GenerativeJudge, SGLangRewardModel, aggregate

ROOT = pathlib.Path(__file__).resolve().parent.parent


def candidate(answer: str, steps: tuple[str, ...] = ("6 * 7 = 42",)) -> Candidate:
    return Candidate("c", tuple(Checkpoint(s) for s in steps), "checked", answer, True)


@pytest.mark.parametrize(("how", "value"), [("min", 0.2), ("last", 0.9), ("prod", 0.9 * 0.2 * 0.9)])
def test_aggregation(how, value):
    assert aggregate([0.9, 0.2, 0.9], how) == pytest.approx(value)


def test_unknown_aggregation_is_rejected_by_name():
    with pytest.raises(InvalidRequest) as info:
        aggregate([0.5], "mean")
    assert info.value.field == "aggregation" and "last, min, prod" in info.value.reason


def test_calibration_maths():
    assert auroc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.9], [True, False]) == 0.0
    assert expected_calibration_error([0.95, 0.95], [True, True]) == pytest.approx(0.05)
    assert fit_threshold([0.2, 0.4, 0.6, 0.8], [False, False, True, True]) == 0.6
    assert largest_supported_n({1: 0.3, 2: 0.4, 3: 0.35, 4: 0.5}) == 2


def test_best_of_n_curve_picks_the_top_scored_candidate():
    items = [Labelled(0, candidate("1"), False, 0.9), Labelled(0, candidate("2"), True, 0.8), Labelled(1, candidate("3"), True, 0.1)]
    assert best_of_n_curve(items, 2) == {1: 0.5, 2: 0.5}


async def test_judge_scores_a_batch_in_one_engine_call(engine):
    judge = GenerativeJudge(engine)
    jobs = engine.stats.jobs_started
    scores = await judge.outcome("What is 6 * 7?", [candidate("42"), candidate("41"), candidate("13")])
    assert engine.stats.jobs_started == jobs + 1
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)
    steps = await judge.process("What is 6 * 7 - 5?", [candidate("37", ("6 * 7 = 42", "42 - 5 = 37")), candidate("1", ())])
    assert [len(s) for s in steps] == [2, 0]


async def test_learned_scores_rank_but_never_override_exact_checks(engine):
    """A calibration threshold of 0 would pass anything: the exact check still decides."""
    core = VerifierCore(scorer=GenerativeJudge(engine), calibration=Calibration("x", 0.0, 4, 0.5, 0.1, {}))
    core.calibration = Calibration(core.scorer.name, 0.0, 4, 0.5, 0.1, {})
    task = TaskSpec("arithmetic", (CheckSpec("arithmetic", {"expression": "6 * 7"}),))
    verdicts, info = await core.verify_scored(task, {}, (), [candidate("41")], problem="What is 6 * 7?", learned="outcome")
    assert not verdicts[0].release and verdicts[0].learned_score is not None
    assert info.calibrated and info.max_n == 4


async def test_calibrated_threshold_gates_tasks_without_an_exact_check(engine):
    judge = GenerativeJudge(engine)
    strict = VerifierCore(scorer=judge, calibration=Calibration(judge.name, 0.999, 4, 0.5, 0.1, {}))
    evidence = {"eta": "Delivery tomorrow."}
    good = Candidate("g", (Checkpoint("Delivery tomorrow.", ("eta",)),), "ok", "Delivery tomorrow.", True)
    plain, _ = await strict.verify_scored(TaskSpec("support"), evidence, ("eta",), [good])
    scored, _ = await strict.verify_scored(TaskSpec("support"), evidence, ("eta",), [good], problem="When?", learned="outcome")
    assert plain[0].release and not scored[0].release


async def test_verifier_without_a_scorer_refuses_learned_scoring(mesh):
    async with mesh.channel("verifier") as channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        request = verifier_pb2.VerifyRequest(learned_score=verifier_pb2.LEARNED_SCORE_MODE_OUTCOME)
        request.candidates.add(id="a", final_answer="1")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Verify(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details().startswith("learned_score:")


async def test_process_scores_over_grpc_with_the_embedded_judge(engine, tmp_path):
    service = await start_verifier("127.0.0.1:0", SETTINGS, tracer_provider("v", {}), GenerativeJudge(engine), None)
    try:
        async with inner_channel(f"127.0.0.1:{service.port}") as channel:
            stub = verifier_pb2_grpc.VerifierServiceStub(channel)
            request = verifier_pb2.VerifyRequest(
                problem="What is 6 * 7 - 5?", learned_score=verifier_pb2.LEARNED_SCORE_MODE_PROCESS, aggregation="prod"
            )
            request.task.checks.add(name="arithmetic").params.update({"expression": "6 * 7 - 5"})
            for i, answer in enumerate(["37", "36"]):
                c = request.candidates.add(id=f"b{i}", final_answer=answer, well_formed=True)
                c.checkpoints.add(text="6 * 7 = 42")
                c.checkpoints.add(text=f"42 - 5 = {answer}")
            reply = await stub.Verify(request, timeout=60)
            assert reply.scorer.startswith("generative-judge:") and not reply.calibrated
            for verdict in reply.verdicts:
                assert verdict.learned_scored and len(verdict.learned_step_scores) == 2
                assert verdict.learned_score == pytest.approx(verdict.learned_step_scores[0] * verdict.learned_step_scores[1], abs=1e-5)
            assert [v.release for v in reply.verdicts] == [True, False]
            request.aggregation = "mean"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Verify(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("aggregation:")
    finally:
        await service.stop(1)


# -- SGLang reward model: contract test against a stand-in ---------------------------------------


class FakeRewardModel(BaseHTTPRequestHandler):
    """Test double for SGLang's /classify (0.5.23): {"text": [...]} in; a list of
    {"embedding": [reward, ...], "meta_info": {...}} out, reward = embedding[0]."""

    bodies: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        items = [{"embedding": [2.0 if "42" in t else -2.0, 0.0], "meta_info": {"prompt_tokens": 9}} for t in body["text"]]
        data = json.dumps(items).encode()
        self.send_response(200 if self.path == "/classify" else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


async def test_sglang_reward_model_contract():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRewardModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        model = SGLangRewardModel(f"http://127.0.0.1:{server.server_address[1]}")
        scores = await model.outcome("What is 6 * 7?", [candidate("42"), candidate("41")])
        assert len(FakeRewardModel.bodies[-1]["text"]) == 2
        # A conversation in the reward model's template: the question, then the answer as its turn.
        assert FakeRewardModel.bodies[-1]["text"][0] == (
            "<|im_start|>user\nWhat is 6 * 7?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
        )
        assert scores[0] == pytest.approx(1 / (1 + 2.718281828 ** -2), rel=1e-4) and scores[1] < 0.5
        steps = await model.process("q", [candidate("42", ("a", "b = 42"))])
        assert len(steps[0]) == 2
        await model.aclose()
    finally:
        server.shutdown()


async def test_calibrate_command_records_where_the_threshold_came_from(tmp_path):
    import asyncio

    calibration, report = tmp_path / "judge.json", tmp_path / "verifier.json"
    process = await asyncio.create_subprocess_exec(
        str(pathlib.Path(sys.executable).parent / "rmesh"), "verifier", "calibrate", "--size", "4", "--k", "2",
        "--calibration", str(calibration), "--report", str(report),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, err.decode()
    doc = json.loads(calibration.read_text())
    assert doc["scorer"].startswith("generative-judge:") and 1 <= doc["max_n"] <= 2
    assert doc["source"]["tasks"] == 4 and "reasoning-gym" in doc["source"]["dataset"]
    bench = json.loads(report.read_text())
    assert set(bench["checkers"]) >= {"arithmetic", "python_tests", "regex"}
    assert bench["sandbox_checks_per_second"] > 0


async def test_solver_caps_n_at_what_the_calibration_supports(engine, tmp_path):
    """Ranking by a learned score, best_of_n samples no more than the calibration's max N."""
    from rmesh import convert
    from rmesh.api.solver.v1 import solver_pb2_grpc
    from rmesh.domain import Budget, SearchParams
    from rmesh.solver_svc.serve import start_solver
    from rmesh.solving import SolveRequest

    judge = GenerativeJudge(engine)
    verifier = await start_verifier(
        "127.0.0.1:0", SETTINGS, tracer_provider("v", {}), judge, Calibration(judge.name, 0.5, 2, 0.6, 0.1, {})
    )
    solver = await start_solver(
        "127.0.0.1:0", SETTINGS, tracer_provider("s", {}), f"127.0.0.1:{verifier.port}", engine, own_engine=False
    )
    try:
        request = SolveRequest(
            problem="What is 9 + 8 + 2?",
            task=TaskSpec("arithmetic", (CheckSpec("arithmetic", {"expression": "9 + 8 + 2"}),)),
            strategy="self_consistency",
            budget=Budget(1200, 6, 4, 60, 120),
            search=SearchParams(samples=6, learned_score="outcome"),
        )
        async with inner_channel(f"127.0.0.1:{solver.port}") as channel:
            stub = solver_pb2_grpc.SolverServiceStub(channel)
            messages = [m async for m in stub.Solve(convert.solve_request_to_proto(request), timeout=120)]
        result = messages[-1].result
        assert result.candidates_evaluated == 2
        assert result.verdict.learned_scored
    finally:
        await solver.stop(1)
        await verifier.stop(1)
