"""Shared fixtures: one embedded engine per session and a real mesh on port-0 addresses."""

from __future__ import annotations

import pathlib

import os

import grpc
import pytest
from hypothesis import settings
import pytest_asyncio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rmesh.config import ServerSettings
from rmesh.engine.llama import LlamaEngine
from rmesh.grpc_edge import SERVICE_TOKEN_HEADER, service_token_interceptors
from rmesh.mesh.serve import start_services

ROOT = pathlib.Path(__file__).resolve().parent.parent

# CI replays a fixed set of examples so a landing never hinges on a lucky draw; locally each
# run explores new ones (and remembers failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
DEMO_KEY = "demo-key"
# The mesh's shared service token in tests: the solver and the verifier answer only callers with it.
SERVICE_TOKEN = "test-service-token-3b9e0c51"
SERVICE_METADATA = [(SERVICE_TOKEN_HEADER, SERVICE_TOKEN)]
# Server settings for services a test starts one by one.
SETTINGS = ServerSettings(service_token=SERVICE_TOKEN)


def inner_channel(address: str) -> grpc.aio.Channel:
    """A channel to the solver or the verifier that presents the mesh's service token."""
    return grpc.aio.insecure_channel(address, interceptors=service_token_interceptors(SERVICE_TOKEN))


@pytest.fixture(scope="session")
def engine():
    """The real embedded model, loaded once: small context, four branches."""
    eng = LlamaEngine.load(n_ctx=4096, max_branches=4)
    yield eng


def service_env(tmp: pathlib.Path, **extra: str) -> dict[str, str]:
    """Environment for ``start_services`` in a test: ports the OS picks, the shipped tenants,
    a review database under ``tmp``, internal calls over gRPC even with all three services in
    the process (tests/test_colocated.py covers in-process calls); ``extra`` adds or overrides
    RMESH_* settings."""
    return {
        "RMESH_COLOCATED_CALLS": "0",
        "RMESH_ROUTER_ADDR": "127.0.0.1:0",
        "RMESH_SOLVER_ADDR": "127.0.0.1:0",
        "RMESH_VERIFIER_ADDR": "127.0.0.1:0",
        "RMESH_TENANTS_DIR": str(ROOT / "policy" / "tenants"),
        "RMESH_REVIEW_DB": str(tmp / "reviews.sqlite3"),
        "RMESH_SERVICE_TOKEN": SERVICE_TOKEN,
        **extra,
    }


class Mesh:
    def __init__(self, services, spans: InMemorySpanExporter, engine) -> None:
        self.services = {s.name: s for s in services}
        self.spans = spans
        self.engine = engine

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.services[name].port}"

    def channel(self, name: str = "router") -> grpc.aio.Channel:
        if name == "router":
            return grpc.aio.insecure_channel(self.address(name))
        return inner_channel(self.address(name))


@pytest_asyncio.fixture(scope="session")
async def mesh(engine, tmp_path_factory):
    """Router, solver and verifier as real grpc.aio servers on ports the OS picks."""
    spans = InMemorySpanExporter()
    env = service_env(tmp_path_factory.mktemp("reviews"), RMESH_MAX_MESSAGE_BYTES=str(256 * 1024))
    services = await start_services(
        ("verifier", "solver", "router"), env, engine=engine, extra_processors=[SimpleSpanProcessor(spans)]
    )
    yield Mesh(services, spans, engine)
    for service in reversed(services):
        await service.stop(1)
