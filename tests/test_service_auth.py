"""Only the mesh can call its inner services. Two layouts, each on real ports: mutual TLS from
certificate files (made by scripts/dev-certs.sh, as `make certs` does), and, without TLS, a shared
service token. A direct call without the mesh's credentials is refused; a solver or verifier with
neither configured refuses to start."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys

import grpc
import pytest
import pytest_asyncio
from conftest import ROOT, service_env

from rmesh.api.verifier.v1 import verifier_pb2, verifier_pb2_grpc
from rmesh.client import AsyncMeshClient, ClientOptions
from rmesh.engine.instant import InstantEngine
from rmesh.mesh.serve import start_services
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = pathlib.Path(sys.executable).parent


def make_certs(directory: pathlib.Path) -> pathlib.Path:
    subprocess.run(["bash", str(ROOT / "scripts" / "dev-certs.sh"), str(directory)], check=True, capture_output=True, timeout=60)
    return directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> pathlib.Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest_asyncio.fixture
async def tls_mesh(certs, tmp_path):
    env = service_env(
        tmp_path,
        RMESH_SERVICE_TOKEN="",
        RMESH_MESH_TLS_CERT=str(certs / "solver.pem"),
        RMESH_MESH_TLS_KEY=str(certs / "solver.key"),
        RMESH_MESH_TLS_CA=str(certs / "ca.pem"),
        RMESH_TLS_CERT=str(certs / "router.pem"),
        RMESH_TLS_KEY=str(certs / "router.key"),
        RMESH_HEALTH_ADDR="127.0.0.1:0",
    )
    del env["RMESH_SERVICE_TOKEN"]
    services = await start_services(("verifier", "solver", "router"), env, engine=InstantEngine())
    yield {s.name: s for s in services}
    for service in reversed(services):
        await service.stop(0)


def read(path: pathlib.Path) -> bytes:
    return path.read_bytes()


async def list_checkers(address: str, credentials: grpc.ChannelCredentials | None) -> list[str]:
    channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    async with channel:
        reply = await verifier_pb2_grpc.VerifierServiceStub(channel).ListCheckers(verifier_pb2.ListCheckersRequest(), timeout=5)
    return list(reply.names)


async def test_with_mutual_tls_the_mesh_answers_and_callers_without_a_mesh_certificate_are_refused(tls_mesh, certs, tmp_path):
    router = f"127.0.0.1:{tls_mesh['router'].port}"
    # A caller reaches the router over TLS (its public port: server certificate only).
    options = ClientOptions(address=router, api_key="demo-key", root_certificates=read(certs / "ca.pem"))
    async with AsyncMeshClient(options=options) as client:
        outcome = await client.outcome("What is 2 + 3?", checks=[{"name": "arithmetic", "params": {"expression": "2 + 3"}}])
    assert outcome.released and outcome.answer == "5"
    # So does `rmesh solve`, given the CA in RMESH_CLIENT_CA.
    env = {**os.environ, "RMESH_ROUTER_ADDR": router, "RMESH_CLIENT_CA": str(certs / "ca.pem")}
    process = await asyncio.create_subprocess_exec(
        str(BIN / "rmesh"), "solve", "--problem", "Say hi.", "--json", env=env, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 120)
    last = json.loads(stdout.decode().strip().splitlines()[-1])
    assert process.returncode == 0 and last["released"] and last["assurance"] == "ASSURANCE_UNVERIFIED"

    verifier = f"127.0.0.1:{tls_mesh['verifier'].port}"
    mesh_cert = grpc.ssl_channel_credentials(read(certs / "ca.pem"), read(certs / "router.key"), read(certs / "router.pem"))
    assert "arithmetic" in await list_checkers(verifier, mesh_cert)
    other = make_certs(tmp_path / "other-ca")  # a certificate from a CA the mesh does not trust
    refused = {
        "plaintext": None,
        "TLS without a client certificate": grpc.ssl_channel_credentials(read(certs / "ca.pem")),
        "a certificate of another CA": grpc.ssl_channel_credentials(
            read(certs / "ca.pem"), read(other / "router.key"), read(other / "router.pem")
        ),
    }
    for why, credentials in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_checkers(verifier, credentials)
        # The TLS handshake refuses the peer before any handler runs.
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, why


async def test_the_health_only_port_serves_health_and_nothing_else(certs, tmp_path):
    env = service_env(
        tmp_path,
        RMESH_MESH_TLS_CERT=str(certs / "verifier.pem"),
        RMESH_MESH_TLS_KEY=str(certs / "verifier.key"),
        RMESH_MESH_TLS_CA=str(certs / "ca.pem"),
        RMESH_HEALTH_ADDR="127.0.0.1:48311",
    )
    (service,) = await start_services(("verifier",), env)
    try:
        async with grpc.aio.insecure_channel("127.0.0.1:48311") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await verifier_pb2_grpc.VerifierServiceStub(channel).ListCheckers(verifier_pb2.ListCheckersRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await service.stop(0)


@pytest.mark.parametrize("service", ["solver", "verifier"])
def test_an_inner_service_without_tls_or_a_token_refuses_to_start(service, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMESH_")}
    env.update({"RMESH_SOLVER_ADDR": "127.0.0.1:0", "RMESH_VERIFIER_ADDR": "127.0.0.1:0", "RMESH_ENGINE": "instant"})
    result = subprocess.run([str(BIN / f"rmesh-{service}"), "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"rmesh-{service}: RMESH_SERVICE_TOKEN: the {service} answers only the mesh's services; set a shared "
        "service token (or RMESH_MESH_TLS_CERT, RMESH_MESH_TLS_KEY and RMESH_MESH_TLS_CA for mutual TLS)"
    )
    short = subprocess.run(
        [str(BIN / f"rmesh-{service}"), "serve"], env={**env, "RMESH_SERVICE_TOKEN": "short"}, capture_output=True, text=True, timeout=120
    )
    assert short.returncode == 2 and "RMESH_SERVICE_TOKEN: shorter than 16 characters" in short.stderr
