"""The ``rmesh`` command line, run as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
RMESH = str(pathlib.Path(sys.executable).parent / "rmesh")


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        RMESH, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 180)
    return process.returncode, stdout.decode(), stderr.decode()


def cli_env(mesh, **extra) -> dict[str, str]:
    return {**os.environ, "RMESH_ROUTER_ADDR": mesh.address("router"), "RMESH_API_KEY": "demo-key", **extra}


async def test_solve_json_ends_with_the_outcome_line(mesh):
    code, out, err = await run_cli("solve", "--json", "--file", "examples/fulfillment.yaml", env=cli_env(mesh))
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["event"] for line in lines[:2]] == ["status", "config"]
    last = lines[-1]
    assert last["event"] == "outcome"
    assert {"released", "answer", "missing_evidence", "strategy", "usage"} <= set(last)
    assert set(last["usage"]) == {"prompt_tokens", "completion_tokens", "cached_tokens"}
    assert all(isinstance(v, int) for v in last["usage"].values())
    assert last["released"] is True and last["answer"], (last, err)
    assert code == 0


async def test_solve_without_carrier_names_the_missing_key(mesh):
    code, out, _ = await run_cli(
        "solve", "--json", "--file", "examples/fulfillment.yaml", "--drop-evidence", "carrier", env=cli_env(mesh)
    )
    last = json.loads(out.splitlines()[-1])
    assert last["released"] is False and last["missing_evidence"] == ["carrier"]
    assert code == 3


async def test_solve_reports_a_status_error_and_exits_non_zero(mesh):
    code, out, err = await run_cli("solve", "--problem", "hi", env=cli_env(mesh, RMESH_API_KEY="wrong"))
    assert code == 1
    assert "UNAUTHENTICATED" in err


def test_help_is_instant_and_lists_commands():
    started = time.monotonic()
    result = subprocess.run([RMESH, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "serve" in result.stdout and "solve" in result.stdout
    # Heavy modules (llama.cpp, grpc) are imported lazily.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, rmesh.mesh.cli; print('llama_cpp' in sys.modules, 'grpc' in sys.modules)"],
        capture_output=True, text=True, timeout=30,
    )
    assert probe.stdout.split() == ["False", "False"]
    assert time.monotonic() - started < 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_starts_all_three_and_stops_gracefully_on_sigint(tmp_path):
    """``rmesh serve`` is what ``make run`` starts: all three SERVING, then Ctrl-C drains and exits 0."""
    ports = {name: _free_port() for name in ("ROUTER", "SOLVER", "VERIFIER")}
    metrics_port = _free_port()
    env = {
        **os.environ,
        **{f"RMESH_{n}_ADDR": f"127.0.0.1:{p}" for n, p in ports.items()},
        "RMESH_GRACE_SECONDS": "2",
        "RMESH_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "RMESH_REVIEW_DB": str(tmp_path / "reviews.sqlite3"),
    }
    process = subprocess.Popen([RMESH, "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        statuses = {}
        while time.monotonic() < deadline and len(statuses) < 3:
            for name, port in ports.items():
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    try:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                        statuses[name] = reply.status
                    except grpc.RpcError:
                        pass
            time.sleep(0.3)
        assert statuses == {name: health_pb2.HealthCheckResponse.SERVING for name in ports}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            exposition = response.read().decode()
        assert "rmesh_policy_last_reload_success 1.0" in exposition
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "stopping" in output and output.rstrip().endswith("stopped")


@pytest.mark.parametrize(
    "script, env, line",
    [
        ("rmesh-solver", {"RMESH_MODEL_PATH": "/no/such/model.gguf"}, "rmesh-solver: RMESH_MODEL_PATH=/no/such/model.gguf: no such model file"),
        ("rmesh-solver", {"RMESH_ENGINE": "instant", "RMESH_KV_WAIT_SECONDS": "soon"}, "rmesh-solver: RMESH_KV_WAIT_SECONDS='soon' is not a number"),
        ("rmesh-verifier", {"RMESH_JUDGE": "maybe"}, "rmesh-verifier: RMESH_JUDGE: 'maybe' is not one of off, embedded, sglang"),
        ("rmesh-router", {"RMESH_TENANTS_DIR": "/no/such/tenants"}, "rmesh-router: tenant directory /no/such/tenants does not exist (set --tenants or RMESH_TENANTS_DIR)"),
        ("rmesh", {"RMESH_ENGINE": "gpu"}, "rmesh serve: RMESH_ENGINE: unknown engine 'gpu'; known: embedded, sglang, instant (benchmarks only)"),
        ("rmesh-verifier", {"RMESH_MAX_MESSAGE_BYTES": "-1"}, "rmesh-verifier: RMESH_MAX_MESSAGE_BYTES='-1' is out of range: from 1024 to 2147483647"),
        ("rmesh-verifier", {"RMESH_METRICS_ADDR": "garbage"}, "rmesh-verifier: RMESH_METRICS_ADDR='garbage' is not host:port with a port from 0 to 65535"),
        ("rmesh-router", {"RMESH_TENANTS_DIR": str(ROOT / "policy" / "tenants"), "RMESH_REVIEW_DB": "postgresql://u:pw-secret@127.0.0.1:1/db"},
         "rmesh-router: RMESH_REVIEW_DB=postgresql://127.0.0.1/db: cannot open the review store (connection failed: "
         'connection to server at "127.0.0.1", port 1 failed: Connection refused)'),
    ],
)
def test_a_service_missing_what_it_needs_exits_with_one_line(tmp_path, script, env, line):
    """Each console script, started without a model, with a bad setting or without its tenants:
    exit status 2 and one line naming what is missing, no traceback, nothing left listening."""
    ports = {f"RMESH_{s}_ADDR": "127.0.0.1:0" for s in ("ROUTER", "SOLVER", "VERIFIER")}
    result = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / script), "serve"],
        cwd=tmp_path, env={**os.environ, **ports, **env}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [line]
