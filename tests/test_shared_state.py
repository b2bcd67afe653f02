"""State shared by router replicas: with a PostgreSQL review store, a tenant's concurrency cap and
token window hold across every router, and a killed router's reservations come back within the
lease. Real PostgreSQL (`.ci/run` starts one), real router processes on real ports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import socket
import sys
import threading
import time
import urllib.parse
import uuid

import grpc
import pytest
from conftest import ROOT, SERVICE_TOKEN, service_env

from rmesh.api.review.v1 import review_pb2, review_pb2_grpc
from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.engine.instant import InstantEngine
from rmesh.errors import ConfigError, ResourceExhausted, Unavailable
from rmesh.mesh.serve import start_services
from rmesh.peers import wait_serving
from rmesh.router_svc.policy.model import Quotas
from rmesh.router_svc.quotas import SharedAdmission
from rmesh.router_svc.reviews import SCHEMA_VERSION, PostgresReviewStore

POSTGRES = os.environ.get("RMESH_TEST_POSTGRES_URL", "")
pytestmark = pytest.mark.skipif(not POSTGRES, reason="RMESH_TEST_POSTGRES_URL is not set (.ci/run starts a real PostgreSQL and sets it)")
RMESH = str(pathlib.Path(sys.executable).parent / "rmesh")


@pytest.fixture
def admission():
    """Make SharedAdmission instances (each its own pool, as separate routers have); all are
    closed after the test."""
    made: list[SharedAdmission] = []

    def make(**options) -> SharedAdmission:
        made.append(SharedAdmission(POSTGRES, **options))
        return made[-1]

    yield make
    for one in made:
        one.close()


def tenant_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"  # PostgreSQL keeps rows across tests: each test its own tenant


async def test_two_routers_share_one_concurrency_cap_and_token_window(admission):
    routers = [admission(), admission()]
    tenant = tenant_name()
    quotas = Quotas(max_concurrent=4, tokens_per_window=100_000, window_seconds=60)
    admitted, refused, peak, live = 0, 0, 0, 0

    async def one(router: SharedAdmission) -> None:
        nonlocal admitted, refused, peak, live
        try:
            async with router.admit(tenant, quotas, 100) as record:
                admitted += 1
                live += 1
                peak = max(peak, live)
                await asyncio.sleep(1.0)
                record(40)
                live -= 1
        except ResourceExhausted as exc:
            refused += 1
            assert exc.violations[0].subject == f"tenant:{tenant}:concurrent_solves"

    await asyncio.gather(*(one(routers[i % 2]) for i in range(16)))
    assert (admitted, refused, peak) == (4, 12, 4)
    assert routers[0].usage(tenant, 60) == (0, 0, 160)  # four requests, 40 tokens each

    window = Quotas(max_concurrent=100, tokens_per_window=1000, window_seconds=60)
    other = tenant_name()
    async with contextlib.AsyncExitStack() as stack:
        for i in range(3):
            await stack.enter_async_context(routers[i % 2].admit(other, window, 300))
        with pytest.raises(ResourceExhausted) as info:
            async with routers[1].admit(other, window, 300):
                pass
    assert "would be exceeded (0 used, 900 reserved, 300 asked)" in info.value.message


async def test_a_dead_routers_reservations_return_within_the_lease(admission):
    tenant = tenant_name()
    quotas = Quotas(max_concurrent=1, tokens_per_window=100_000, window_seconds=60)
    dead = admission(lease_seconds=2.0)
    await asyncio.to_thread(dead._reserve, tenant, quotas, 500)  # admitted, then never heard from again
    alive = admission(lease_seconds=2.0)
    with pytest.raises(ResourceExhausted):
        async with alive.admit(tenant, quotas, 100):
            pass
    await asyncio.sleep(2.5)
    async with alive.admit(tenant, quotas, 100) as record:
        record(10)
    # The dead reservation is charged what it last reported (nothing), not its 500 tokens.
    assert alive.usage(tenant, 60) == (0, 0, 10)


async def test_a_heartbeat_keeps_a_long_request_admitted(admission):
    tenant = tenant_name()
    quotas = Quotas(max_concurrent=1, tokens_per_window=100_000, window_seconds=60)
    router = admission(lease_seconds=1.5)
    beating = asyncio.create_task(router.heartbeat())
    try:
        async with router.admit(tenant, quotas, 100) as record:
            record(70)
            await asyncio.sleep(3.0)  # twice the lease: only the heartbeat keeps it
            assert router.usage(tenant, 60) == (1, 100, 0)
            with pytest.raises(ResourceExhausted):
                async with admission().admit(tenant, quotas, 100):
                    pass
    finally:
        beating.cancel()
    assert router.usage(tenant, 60) == (0, 0, 70)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_router_processes_share_the_cap_and_a_killed_ones_capacity_returns(tmp_path):
    """Two `rmesh serve router` processes on one PostgreSQL, a tenant capped at 4: sixteen
    concurrent Solves across both admit 4; after kill -9 of a router holding reservations the
    tenant's capacity is back within the lease."""
    tenant = tenant_name()
    key = f"{tenant}-key"
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / f"{tenant}.yaml").write_text(f"""
tenant: {tenant}
api_keys:
  - {{name: app, sha256: {hashlib.sha256(key.encode()).hexdigest()}, role: caller}}
routes:
  - name: any
    difficulty: easy
    strategies: [single_pass]
    budget: {{max_tokens: 200, max_branches: 1, max_depth: 1, wall_clock_seconds: 60, max_tokens_per_branch: 100}}
quotas: {{max_concurrent: 4, tokens_per_window: 100000, window_seconds: 60}}
""")
    peers = await start_services(("verifier", "solver"), service_env(tmp_path), engine=InstantEngine(delay_seconds=3.0))
    ports = [_free_port(), _free_port()]
    env = {
        **os.environ,
        "RMESH_SOLVER_ADDR": f"127.0.0.1:{peers[1].port}",
        "RMESH_VERIFIER_ADDR": f"127.0.0.1:{peers[0].port}",
        "RMESH_TENANTS_DIR": str(tenants),
        "RMESH_REVIEW_DB": POSTGRES,
        "RMESH_SERVICE_TOKEN": SERVICE_TOKEN,
        "RMESH_ADMISSION_LEASE_SECONDS": "3",
    }
    routers = [
        await asyncio.create_subprocess_exec(
            RMESH, "serve", "router", cwd=ROOT, env={**env, "RMESH_ROUTER_ADDR": f"127.0.0.1:{port}"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        for port in ports
    ]

    async def solve(port: int) -> str:
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = router_pb2_grpc.RouterServiceStub(channel)
                call = stub.Solve(router_pb2.SolveRequest(problem="Say hi."), metadata=[("authorization", f"Bearer {key}")], timeout=30)
                events = [e async for e in call]
            return router_pb2.OutcomeKind.Name(events[-1].outcome.kind)
        except grpc.aio.AioRpcError as error:
            return error.code().name

    try:
        for port in ports:
            await wait_serving(f"127.0.0.1:{port}", 60)
        results = await asyncio.gather(*(solve(ports[i % 2]) for i in range(16)))
        assert results.count("OUTCOME_KIND_RELEASED") == 4 and results.count("RESOURCE_EXHAUSTED") == 12, results
        # Router 0 takes the whole cap, then dies holding it.
        held = [asyncio.create_task(solve(ports[0])) for _ in range(4)]
        await asyncio.sleep(1.5)
        assert await solve(ports[1]) == "RESOURCE_EXHAUSTED"
        routers[0].kill()
        await routers[0].wait()
        assert set(await asyncio.gather(*held)) == {"UNAVAILABLE"}
        await asyncio.sleep(3.5)  # one lease
        assert await asyncio.gather(*(solve(ports[1]) for _ in range(4))) == ["OUTCOME_KIND_RELEASED"] * 4
    finally:
        for process in routers:
            if process.returncode is None:
                process.terminate()
                await process.wait()
        for service in reversed(peers):
            await service.stop(0)


# -- the review store: pool, migrations, PostgreSQL going away --------------------------------------


class Proxy:
    """A TCP forwarder to PostgreSQL that the test can cut, as a network partition or a database
    restart would: every open connection drops and new ones are refused."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.up:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def proxied_url(proxy: Proxy) -> str:
    parts = urllib.parse.urlsplit(POSTGRES)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def test_postgresql_going_away_fails_review_calls_with_unavailable_and_solves_keep_running(tmp_path):
    proxy = Proxy(urllib.parse.urlsplit(POSTGRES).port or 5432)
    services = await start_services(
        ("verifier", "solver", "router"),
        service_env(tmp_path, RMESH_REVIEW_DB=proxied_url(proxy)),
        engine=InstantEngine(),
    )
    router = f"127.0.0.1:{services[-1].port}"
    store = services[-1].reviews
    try:
        assert isinstance(services[-1].core.admission, SharedAdmission)
        assert store.schema_version == SCHEMA_VERSION
        assert (await solve_demo(router)).released
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await asyncio.to_thread(store.list, "demo")
        assert info.value.message.startswith("review store unavailable:") and time.monotonic() - started < 15
        # A Solve still runs: the prior falls back to the ladder's start, admission to this router's ledger.
        outcome = await solve_demo(router)
        assert outcome.released and outcome.answer == "5"
        async with grpc.aio.insecure_channel(router) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await review_pb2_grpc.ReviewServiceStub(channel).ListReviews(
                    review_pb2.ListReviewsRequest(), metadata=[("authorization", "Bearer demo-key")], timeout=30
                )
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE and "review store unavailable" in rpc.value.details()
    finally:
        for service in reversed(services):
            await service.stop(0)


async def solve_demo(router: str) -> router_pb2.Outcome:
    request = router_pb2.SolveRequest(problem="What is 2 + 3?")
    request.task.checks.add(name="arithmetic").params.update({"expression": "2 + 3"})
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        events = [e async for e in stub.Solve(request, metadata=[("authorization", "Bearer demo-key")], timeout=60)]
    return events[-1].outcome


def test_postgresql_schema_is_versioned_and_a_newer_one_is_refused():
    import psycopg

    store = PostgresReviewStore(POSTGRES)
    try:
        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            assert connection.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
            columns = {row[0] for row in connection.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'reviews'"
            )}
            assert {"caller", "draft"} <= columns
            connection.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
        with pytest.raises(ConfigError) as info:
            PostgresReviewStore(POSTGRES)
        assert f"schema is version {SCHEMA_VERSION + 1}, newer than this router's {SCHEMA_VERSION}" in str(info.value)
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            connection.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
        store.close()


async def test_a_caller_leaving_mid_admission_leaves_no_reservation_behind(admission):
    """A deadline or a cancel while the reservation waits for the tenant's lock: once it commits,
    its row is closed at once, not left holding the tenant's capacity until its lease ends."""
    import psycopg

    tenant = tenant_name()
    quotas = Quotas(max_concurrent=1, tokens_per_window=100_000, window_seconds=60)
    router = admission()

    async def hold() -> None:
        async with router.admit(tenant, quotas, 100):
            await asyncio.sleep(30)

    with psycopg.connect(POSTGRES, autocommit=True) as blocker:
        blocker.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (tenant,))
        waiting = asyncio.create_task(hold())
        await asyncio.sleep(0.3)
        waiting.cancel()
        blocker.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (tenant,))
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(1.0)  # the reservation commits once the lock is free, then is closed
    assert router.usage(tenant, 60) == (0, 0, 0)
    async with router.admit(tenant, quotas, 100):
        pass


async def test_postgresql_answering_with_an_error_fails_closed_instead_of_falling_back(admission):
    """A lock timeout is PostgreSQL answering, not PostgreSQL gone: no local ledger then, which
    would let every router admit the tenant's whole cap on its own."""
    import psycopg

    tenant = tenant_name()
    quotas = Quotas(max_concurrent=1, tokens_per_window=100_000, window_seconds=60)
    separator = "&" if "?" in POSTGRES else "?"
    impatient = SharedAdmission(f"{POSTGRES}{separator}options=-c%20lock_timeout%3D100ms")
    try:
        with psycopg.connect(POSTGRES, autocommit=True) as blocker:
            blocker.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (tenant,))
            with pytest.raises(Unavailable) as info:
                async with impatient.admit(tenant, quotas, 100):
                    pass
            blocker.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (tenant,))
        assert f"tenant {tenant}: quotas could not be checked" in info.value.message
    finally:
        impatient.close()
