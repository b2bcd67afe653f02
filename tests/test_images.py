"""The container images, run as three containers the way an operator runs them: non-root, a
read-only root filesystem, the tenants mounted read-only; a Solve sent from the host through the
router container, on the instant engine and on the embedded model; health and SIGTERM grace.

Needs podman and the images (`make images`): `make test-images` builds them and runs this file,
and `.ci/run` runs it after `make test`. Under plain `make test` it skips, saying so."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import time
import uuid

import grpc
from conftest import SERVICE_TOKEN
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmesh.client import AsyncMeshClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
TAG = next(
    line.split(":", 1)[1].strip().strip('"')
    for line in (ROOT / "helm" / "reasoning-mesh" / "Chart.yaml").read_text().splitlines()
    if line.startswith("appVersion:")
)
IMAGES = {s: f"localhost/rmesh-{s}:{TAG}" for s in ("router", "solver", "verifier")}
ARITHMETIC = {"kind": "arithmetic", "checks": [{"name": "arithmetic", "params": {"expression": "2 + 3"}}]}

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.environ.get("RMESH_TEST_IMAGES") != "1",
        reason="needs podman and the service images: `make test-images` builds them and runs this (CI does)",
    ),
]


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "build" / "podman" / "containers.conf")}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Containers:
    """Containers on one podman network, named by service; each publishes its port on loopback."""

    def __init__(self) -> None:
        self.suffix = uuid.uuid4().hex[:8]
        self.network = f"rmesh-test-{self.suffix}"
        self.ports: dict[str, int] = {}
        self.addresses: dict[str, tuple[str, str]] = {}
        podman("network", "create", self.network)

    def name(self, service: str) -> str:
        return f"{service}-{self.suffix}"

    def run(self, service: str, image: str, container_port: int, *options: str) -> None:
        self.ports[service] = free_port()
        if service in self.addresses:
            # A restarted service keeps its address, as a Kubernetes Service's stays put; its MAC
            # too, or its peers' neighbour caches point at the old container for a while.
            ip, mac = self.addresses[service]
            options = ("--ip", ip, "--mac-address", mac, *options)
        podman(
            "run", "-d", "--name", self.name(service), "--network", self.network,
            "--network-alias", service, "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "-p", f"127.0.0.1:{self.ports[service]}:{container_port}",
            "-e", "RMESH_GRACE_SECONDS=5", "-e", f"RMESH_SERVICE_TOKEN={SERVICE_TOKEN}", *options, image,
        )

    def stop(self, service: str, timeout: int = 20) -> tuple[int, float, str]:
        networks = json.loads(podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", self.name(service)).stdout)
        self.addresses[service] = (networks[self.network]["IPAddress"], networks[self.network]["MacAddress"])
        started = time.monotonic()
        podman("stop", "-t", str(timeout), self.name(service), timeout=timeout + 30)
        took = time.monotonic() - started
        code = int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name(service)).stdout.strip())
        logs = podman("logs", self.name(service)).stderr + podman("logs", self.name(service)).stdout
        podman("rm", "-f", self.name(service))
        return code, took, logs

    def close(self) -> None:
        for service in list(self.ports):
            podman("rm", "-f", "-t", "0", self.name(service), check=False)
        podman("network", "rm", "-f", self.network, check=False)


def serving(port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"nothing SERVING on 127.0.0.1:{port} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def images() -> dict[str, dict]:
    inspected = {}
    for service, image in IMAGES.items():
        result = podman("image", "inspect", image, check=False)
        assert result.returncode == 0, f"{image} is missing: run `make images`"
        inspected[service] = json.loads(result.stdout)[0]
    return inspected


def test_each_image_runs_its_service_as_a_non_root_user(images):
    for service, info in images.items():
        config = info["Config"]
        assert config["User"] == "10001:10001", service
        assert config["Entrypoint"] == [f"rmesh-{service}"] and config["Cmd"] == ["serve"]
    sizes = {s: info["Size"] / 1e6 for s, info in images.items()}
    assert sizes["router"] < 250 and sizes["verifier"] < 250 and sizes["solver"] < 600, sizes


def test_each_image_carries_only_its_own_service(images):
    probe = (
        "import importlib.util as u; print(sorted(m for m in ('rmesh.router_svc', 'rmesh.solver_svc', "
        "'rmesh.verifier_svc', 'celpy', 'llama_cpp', 'grpc_tools', 'reasoning_gym') if u.find_spec(m)))"
    )
    found = {
        s: podman("run", "--rm", "--read-only", "--entrypoint", "python", image, "-c", probe).stdout.strip()
        for s, image in IMAGES.items()
    }
    assert found == {
        "router": "['celpy', 'rmesh.router_svc']",
        "solver": "['llama_cpp', 'rmesh.solver_svc']",
        "verifier": "['rmesh.verifier_svc']",
    }


def test_no_image_holds_a_setuid_or_setgid_program(images):
    for image in IMAGES.values():
        # As root, so that no directory is hidden from the search.
        found = podman("run", "--rm", "--read-only", "--user", "0", "--entrypoint", "find", image, "/", "-xdev", "-type", "f", "-perm", "/6000")
        assert found.stdout.strip() == "", (image, found.stdout)


def test_the_router_image_without_tenants_exits_with_one_line(images):
    result = podman("run", "--rm", "--read-only", IMAGES["router"], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "rmesh-router: tenant directory /etc/rmesh/tenants does not exist (set --tenants or RMESH_TENANTS_DIR)"
    )


async def test_three_containers_serve_solve_on_both_engines_and_stop_gracefully(images):
    mesh = Containers()
    try:
        mesh.run("verifier", IMAGES["verifier"], 50053)
        mesh.run("solver", IMAGES["solver"], 50052, "-e", "RMESH_ENGINE=instant", "-e", "RMESH_VERIFIER_ADDR=verifier:50053")
        mesh.run(
            "router", IMAGES["router"], 50051,
            "-e", "RMESH_SOLVER_ADDR=solver:50052", "-e", "RMESH_VERIFIER_ADDR=verifier:50053",
            "-v", f"{ROOT / 'policy' / 'tenants'}:/etc/rmesh/tenants:ro",
        )
        for service in ("verifier", "solver", "router"):
            serving(mesh.ports[service])
        router = f"127.0.0.1:{mesh.ports['router']}"
        async with AsyncMeshClient(router, api_key="demo-key", timeout=120) as client:
            outcome = await client.outcome("What is 2 + 3?", **ARITHMETIC)
            assert outcome.released and outcome.answer == "5" and outcome.usage.completion_tokens > 0

        # The solver drains and exits 0 on SIGTERM well inside podman's stop timeout.
        code, took, logs = mesh.stop("solver")
        assert code == 0 and took < 15 and "stopped" in logs, logs

        # The same solver image on its embedded model (the default engine): the shipped
        # fulfillment example, answered from its evidence and released.
        mesh.run("solver", IMAGES["solver"], 50052, "-e", "RMESH_VERIFIER_ADDR=verifier:50053")
        serving(mesh.ports["solver"])
        ticket = yaml.safe_load((ROOT / "examples" / "fulfillment.yaml").read_text())
        async with AsyncMeshClient(router, api_key="demo-key", timeout=300) as client:
            # The router finds the restarted solver within its 5 s reconnect backoff.
            deadline = time.monotonic() + 60
            while True:
                try:
                    events = [event async for event in client.solve(ticket)]
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1)
        outcome = events[-1]
        assert [type(e).__name__ for e in events[:2]] == ["StatusEvent", "ConfigEvent"]
        assert type(outcome).__name__ == "Outcome" and outcome.released, outcome
        assert {key for cp in outcome.checkpoints for key in cp.cites} == {"order", "carrier", "return_policy"}
        assert outcome.usage.completion_tokens > 0 and outcome.usage.prompt_tokens > 0

        for service in ("router", "solver", "verifier"):
            code, took, logs = mesh.stop(service)
            assert code == 0 and "stopped" in logs, (service, logs)
    finally:
        mesh.close()


def test_a_base_that_cannot_be_reached_stops_the_build_naming_base():
    result = subprocess.run(
        ["bash", "scripts/images.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "BASE": "registry.invalid/no-such/python:3.11"},
    )
    assert result.returncode == 3
    assert "BASE=registry.invalid/no-such/python:3.11 cannot be found locally or pulled" in result.stderr
