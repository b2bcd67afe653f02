"""The Python client (rmesh.client) against a real mesh: typed events ending in one Outcome,
sync and async; precise errors; review calls; retries through gRPC's service config."""

from __future__ import annotations

import asyncio
import os
import subprocess

import grpc
import pytest

from conftest import ROOT, service_env
from rmesh.api.review.v1 import review_pb2, review_pb2_grpc
from rmesh.client import AsyncMeshClient, ClientOptions, ConfigEvent, MeshClient, Outcome, StatusEvent, build_request
from rmesh.engine.instant import InstantEngine
from rmesh.mesh.serve import start_services

ARITHMETIC = {"kind": "arithmetic", "checks": [{"name": "arithmetic", "params": {"expression": "2 + 3"}}]}


@pytest.fixture(scope="module")
async def router(tmp_path_factory):
    services = await start_services(
        ("verifier", "solver", "router"), service_env(tmp_path_factory.mktemp("client")), engine=InstantEngine()
    )
    yield f"127.0.0.1:{services[-1].port}"
    for service in reversed(services):
        await service.stop(0)


async def test_async_solve_streams_typed_events_and_ends_with_one_outcome(router):
    async with AsyncMeshClient(router, api_key="demo-key", timeout=30) as mesh:
        events = [event async for event in mesh.solve("What is 2 + 3?", **ARITHMETIC)]
    assert isinstance(events[0], StatusEvent) and isinstance(events[1], ConfigEvent)
    assert [type(e) for e in events].count(Outcome) == 1 and isinstance(events[-1], Outcome)
    assert events[-1].released and events[-1].answer == "5"
    assert events[1].tenant == "demo"


async def test_the_blocking_client_gives_the_same_outcome(router):
    def solve() -> Outcome:
        with MeshClient(router, api_key="demo-key", timeout=30) as mesh:
            return mesh.outcome({"problem": "What is 2 + 3?", "task": ARITHMETIC})

    outcome = await asyncio.to_thread(solve)
    assert outcome.released and outcome.answer == "5"


async def test_errors_carry_the_mesh_status_and_name_the_field(router):
    async with AsyncMeshClient(router, api_key="demo-key", timeout=30) as mesh:
        with pytest.raises(grpc.RpcError) as empty:
            await mesh.outcome("   ")
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "problem" in empty.value.details()
    async with AsyncMeshClient(router, api_key="no-such-key", timeout=30) as mesh:
        with pytest.raises(grpc.RpcError) as stranger:
            await mesh.outcome("What is 2 + 3?")
        assert stranger.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_review_calls_follow_the_roles(router):
    async with AsyncMeshClient(router, api_key="demo-key", timeout=30) as caller:
        assert isinstance(await caller.list_reviews("pending"), list)
        with pytest.raises(grpc.RpcError) as refused:
            await caller.resolve_review("r-missing", "approve")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with AsyncMeshClient(router, api_key="demo-reviewer-key", timeout=30) as reviewer:
        with pytest.raises(grpc.RpcError) as missing:
            await reviewer.resolve_review("r-missing", "approve")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_arguments_fail_before_any_call_naming_the_field():
    with pytest.raises(ValueError, match="priority"):
        build_request({"problem": "x", "priority": 1})
    with pytest.raises(ValueError, match="state"):
        MeshClient("127.0.0.1:1").list_reviews("waiting")
    with pytest.raises(ValueError, match="action"):
        MeshClient("127.0.0.1:1").resolve_review("r-1", "maybe")
    with pytest.raises(ValueError, match="max_attempts"):
        ClientOptions(max_attempts=0)
    with pytest.raises(ValueError, match="certificate_chain"):
        ClientOptions(private_key=b"key")
    assert "secret" not in repr(MeshClient("127.0.0.1:1", api_key="secret").options)


class FlakyReviews(review_pb2_grpc.ReviewServiceServicer):
    """Answers UNAVAILABLE to the first ``failures`` calls, then an empty list."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def ListReviews(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return review_pb2.ListReviewsResponse()


@pytest.mark.parametrize("attempts, succeeds", [(3, True), (1, False)])
async def test_unavailable_is_retried_by_grpc_up_to_max_attempts(attempts, succeeds):
    server = grpc.aio.server()
    flaky = FlakyReviews(failures=2)
    review_pb2_grpc.add_ReviewServiceServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncMeshClient(f"127.0.0.1:{port}", max_attempts=attempts, timeout=10) as mesh:
            if succeeds:
                assert await mesh.list_reviews() == []
            else:
                with pytest.raises(grpc.RpcError) as failed:
                    await mesh.list_reviews()
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert flaky.calls == (3 if succeeds else 1)
    finally:
        await server.stop(0)


async def test_the_readme_python_example_runs_as_printed(engine, tmp_path, capsys):
    """The README's client example, run against a real mesh of its own on the embedded model."""
    services = await start_services(("verifier", "solver", "router"), service_env(tmp_path), engine=engine)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Calling it from Python"):]
    code = section[section.index("```python\n") + 10:section.index("```\n", section.index("```python\n") + 10)]
    code = code.replace('"127.0.0.1:50051"', repr(f"127.0.0.1:{services[-1].port}"))
    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(previous)
        for service in reversed(services):
            await service.stop(0)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("StatusEvent") and any(line.startswith("Outcome") for line in printed)
    assert "released: true" in "\n".join(printed)
    assert printed[-1] == "['carrier', 'return_policy']"


async def test_tls_with_the_servers_root_certificate(tmp_path):
    """A TLS server (a self-signed certificate made by openssl): the client with its root
    certificate gets through; without it, the handshake fails and the call is UNAVAILABLE."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    server = grpc.aio.server()
    review_pb2_grpc.add_ReviewServiceServicer_to_server(FlakyReviews(failures=0), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    await server.start()
    try:
        address = f"localhost:{port}"
        async with AsyncMeshClient(address, root_certificates=cert.read_bytes(), timeout=10) as mesh:
            assert mesh.options.secure and await mesh.list_reviews() == []
        async with AsyncMeshClient(address, tls=True, max_attempts=1, timeout=5) as mesh:
            with pytest.raises(grpc.RpcError) as untrusted:
                await mesh.list_reviews()
            assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_the_address_in_options_is_the_one_dialled(monkeypatch):
    """A client built from ClientOptions dials options.address; it never falls back to a
    default address carrying the caller's key."""
    options = ClientOptions(address="mesh.example.internal:443", api_key="k")
    assert MeshClient(options=options).options.address == "mesh.example.internal:443"
    assert MeshClient("other:1", options=options).options.address == "other:1"
    assert AsyncMeshClient.__init__.__defaults__ == (None,)


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"timeout": float("nan")}, "timeout"), ({"timeout": "5"}, "timeout"), ({"max_attempts": True}, "max_attempts"),
        ({"max_message_bytes": 2**70}, "max_message_bytes"), ({"address": "  "}, "address"),
        ({"api_key": "demo-key\n"}, "api_key"), ({"tls": "no"}, "tls"), ({"root_certificates": "PEM"}, "root_certificates"),
    ],
)
def test_each_bad_option_is_refused_naming_it(settings, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        ClientOptions(**settings)


@pytest.mark.parametrize(
    "args, kwargs, field",
    [
        (("x",), {"evidence": ["a"]}, "evidence"), (("x",), {"checks": "arithmetic"}, "checks"),
        (({"problem": "x"},), {"kind": "arithmetic"}, "kind"), ((None,), {}, "problem"),
    ],
)
def test_bad_request_arguments_name_the_field(args, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        build_request(*args, **kwargs)
