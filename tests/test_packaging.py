"""The router installs from its wheel alone, outside the repository, and works: its console
script lints a tenant directory and serves Solve through a real solver and verifier."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from conftest import ROOT, SERVICE_TOKEN, service_env
from rmesh.client import AsyncMeshClient
from rmesh.engine.instant import InstantEngine
from rmesh.mesh.serve import start_services
from rmesh.peers import wait_serving

pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=480, **kwargs)


@pytest.fixture(scope="module")
def router_venv(tmp_path_factory) -> pathlib.Path:
    """A fresh venv holding only the router's wheel, the shared wheel and what they declare."""
    base = tmp_path_factory.mktemp("router-alone")
    wheels = base / "wheels"
    built = run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "-w", wheels, ROOT / "shared", ROOT / "router_svc",
    )
    assert built.returncode == 0, built.stderr
    assert sorted(p.name.split("-")[0] for p in wheels.glob("*.whl")) == ["rmesh_router", "rmesh_shared"]
    venv = base / "venv"
    # The base interpreter, not this venv's: nothing of the development install leaks in.
    base_python = pathlib.Path(getattr(sys, "_base_executable", sys.executable))
    assert run(base_python, "-m", "venv", venv).returncode == 0
    installed = run(
        venv / "bin" / "pip", "install", "--quiet", "--find-links", wheels, "-c", ROOT / "constraints.txt", "rmesh-router",
        cwd=base,
    )
    assert installed.returncode == 0, installed.stderr
    return venv


def venv_env(venv: pathlib.Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RMESH_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return {**env, **extra}


def test_the_router_alone_carries_no_model_and_no_other_service(router_venv, tmp_path):
    probe = (
        "import importlib.util as u;"
        "print([m for m in ('rmesh.router_svc', 'rmesh.api', 'celpy', 'llama_cpp', 'rmesh.solver_svc',"
        " 'rmesh.verifier_svc', 'reasoning_gym', 'grpc_tools') if u.find_spec(m)])"
    )
    result = run(router_venv / "bin" / "python", "-c", probe, cwd=tmp_path, env=venv_env(router_venv))
    assert result.stdout.strip() == "['rmesh.router_svc', 'rmesh.api', 'celpy']", result.stderr


def test_policy_lint_from_the_installed_wheel_by_flag_and_by_environment(router_venv, tmp_path):
    tenants = tmp_path / "tenants"
    shutil.copytree(ROOT / "policy" / "tenants", tenants)
    lint = router_venv / "bin" / "rmesh-router"
    by_flag = run(lint, "policy", "lint", "--tenants", tenants, cwd=tmp_path, env=venv_env(router_venv))
    assert by_flag.returncode == 0, by_flag.stdout + by_flag.stderr
    assert by_flag.stdout.count("ok   ") == len(list(tenants.glob("*.yaml")))
    by_env = run(lint, "policy", "lint", cwd=tmp_path, env=venv_env(router_venv, RMESH_TENANTS_DIR=str(tenants)))
    assert by_env.returncode == 0 and by_env.stdout == by_flag.stdout
    (tenants / "demo.yaml").write_text((tenants / "demo.yaml").read_text().replace("routes:", "routez:", 1))
    broken = run(lint, "policy", "lint", "--tenants", tenants, cwd=tmp_path, env=venv_env(router_venv))
    assert broken.returncode == 1 and "FAIL" in broken.stdout and "demo.yaml" in broken.stdout


def test_the_installed_router_refuses_to_start_without_its_tenants(router_venv, tmp_path):
    result = run(
        router_venv / "bin" / "rmesh-router", "serve", cwd=tmp_path,
        env=venv_env(router_venv, RMESH_ROUTER_ADDR=f"127.0.0.1:{free_port()}"),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "rmesh-router: tenant directory policy/tenants does not exist (set --tenants or RMESH_TENANTS_DIR)"
    )


async def test_the_installed_router_serves_solve_and_stops_on_sigterm(router_venv, tmp_path):
    """Solver and verifier run from the development install; the router from the wheel."""
    peers = await start_services(("verifier", "solver"), service_env(tmp_path), engine=InstantEngine())
    port = free_port()
    env = venv_env(
        router_venv,
        RMESH_ROUTER_ADDR=f"127.0.0.1:{port}",
        RMESH_SOLVER_ADDR=f"127.0.0.1:{peers[1].port}",
        RMESH_VERIFIER_ADDR=f"127.0.0.1:{peers[0].port}",
        RMESH_REVIEW_DB=str(tmp_path / "reviews.sqlite3"),
        RMESH_GRACE_SECONDS="2",
        RMESH_SERVICE_TOKEN=SERVICE_TOKEN,
    )
    router = subprocess.Popen(
        [str(router_venv / "bin" / "rmesh-router"), "serve", "--tenants", str(ROOT / "policy" / "tenants")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        await wait_serving(f"127.0.0.1:{port}", 60)
        async with AsyncMeshClient(f"127.0.0.1:{port}", api_key="demo-key", timeout=60) as mesh:
            outcome = await mesh.outcome(
                "What is 2 + 3?", kind="arithmetic", checks=[{"name": "arithmetic", "params": {"expression": "2 + 3"}}]
            )
            assert outcome.released and outcome.answer == "5"
            with pytest.raises(grpc.RpcError) as refused:
                await mesh.outcome("   ")
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "problem" in refused.value.details()
        router.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert router.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
        assert "stopped" in router.stdout.read()
    finally:
        if router.poll() is None:
            router.kill()
        for service in reversed(peers):
            await service.stop(0)
