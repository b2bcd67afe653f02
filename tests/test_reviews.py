"""Human review: the store on SQLite and on a real PostgreSQL, the gRPC service with tenant
isolation and the reviewer role, expiry, and a router killed mid-review losing nothing."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import sys
import threading
import time
import uuid

import grpc
import pytest

from conftest import SERVICE_TOKEN
from rmesh.api.review.v1 import review_pb2, review_pb2_grpc
from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.errors import FailedPrecondition, InvalidRequest, NotFound
from rmesh.router_svc.reviews import PostgresReviewStore, SQLiteReviewStore
from rmesh.router_svc.rung_log import RungLog

ROOT = pathlib.Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("RMESH_TEST_POSTGRES_URL", "")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        opened = SQLiteReviewStore(tmp_path / "reviews.sqlite3")
    elif not POSTGRES:
        pytest.skip("RMESH_TEST_POSTGRES_URL is not set (.ci/run starts a real PostgreSQL and sets it)")
    else:
        opened = PostgresReviewStore(POSTGRES)
    yield opened
    opened.close()  # PostgreSQL's pool: its worker threads end with it


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # each test its own tenant: PostgreSQL keeps rows across tests


def test_create_get_list(store):
    t = tenant()
    review = store.create(t, "Approve a refund of 900?", "high impact", {"order": "7"}, "rev1", 3600, "reject")
    assert store.get(t, review.id) == review
    assert [r.id for r in store.list(t, "pending")] == [review.id]
    assert store.list(t, "approved") == []


def test_other_tenants_reviews_are_not_found(store):
    review = store.create(tenant(), "p", "r", {}, "rev", 3600, "reject")
    with pytest.raises(NotFound):
        store.get("someone-else", review.id)
    with pytest.raises(NotFound):
        store.resolve("someone-else", review.id, "approve", "mallory")


def test_resolving_is_idempotent_and_final(store):
    t = tenant()
    review = store.create(t, "p", "r", {}, "rev", 3600, "reject")
    first = store.resolve(t, review.id, "edit", "alice", answer="Refund 450 instead.", comment="partial")
    again = store.resolve(t, review.id, "edit", "alice", answer="Refund 450 instead.", comment="partial")
    assert first == again and first.state == "edited" and first.answer == "Refund 450 instead."
    with pytest.raises(FailedPrecondition):
        store.resolve(t, review.id, "reject", "bob")
    assert store.get(t, review.id).reviewer == "alice"


def test_the_draft_and_the_caller_are_kept_and_a_caller_sees_only_its_own(store):
    t = tenant()
    draft = {"answer": "Refund 450.", "checkpoints": [["Order 7", ["order"]]], "checks": [], "assurance": "unverified"}
    mine = store.create(t, "p", "r", {}, "rev", 3600, "reject", caller="app-a", draft=draft)
    theirs = store.create(t, "p", "r", {}, "rev", 3600, "reject", caller="app-b")
    assert store.get(t, mine.id, "app-a").draft == draft
    with pytest.raises(NotFound):
        store.get(t, mine.id, "app-b")
    assert [r.id for r in store.list(t, caller="app-b")] == [theirs.id]
    assert {r.id for r in store.list(t)} == {mine.id, theirs.id}  # a reviewer sees the tenant's


def test_approving_needs_a_draft_answer(store):
    t = tenant()
    review = store.create(t, "p", "r", {}, "rev", 3600, "reject", draft={"answer": ""})
    with pytest.raises(FailedPrecondition) as info:
        store.resolve(t, review.id, "approve", "alice")
    assert "has no draft answer to approve; EDIT with an answer or REJECT" in info.value.message
    assert store.resolve(t, review.id, "edit", "alice", answer="Written by hand.").state == "edited"


def test_a_store_written_before_drafts_gains_the_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE reviews (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL, problem TEXT NOT NULL, "
            "reason TEXT NOT NULL, evidence TEXT NOT NULL, policy_revision TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
            "expires_at DOUBLE PRECISION NOT NULL, on_timeout TEXT NOT NULL, resolved_at DOUBLE PRECISION, "
            "reviewer TEXT NOT NULL DEFAULT '', comment TEXT NOT NULL DEFAULT '', answer TEXT NOT NULL DEFAULT '', "
            "resolution TEXT NOT NULL DEFAULT '')"
        )
        connection.execute("INSERT INTO reviews VALUES ('old', 't', 'pending', 'p', 'r', '{}', 'rev', 1, 9e12, 'reject', NULL, '', '', '', '')")
    store = SQLiteReviewStore(path)
    old = store.get("t", "old")
    assert old.caller == "" and old.draft == {} and old.state == "pending"
    assert store.create("t", "p", "r", {}, "rev", 60, "reject", caller="c", draft={"answer": "x"}).draft == {"answer": "x"}


def test_edit_needs_an_answer(store):
    t = tenant()
    review = store.create(t, "p", "r", {}, "rev", 3600, "reject")
    with pytest.raises(InvalidRequest) as info:
        store.resolve(t, review.id, "edit", "alice")
    assert info.value.field == "answer"


def test_reviews_expire_with_the_tenants_outcome(store):
    t = tenant()
    now = time.time()
    approve_later = store.create(t, "p", "r", {}, "rev", 10, "approve", now=now)
    reject_later = store.create(t, "p", "r", {}, "rev", 10, "reject", now=now)
    store.expire_due(now=now + 5)  # other tenants' rows may share the database: judge only ours
    assert {store.get(t, r.id).state for r in (approve_later, reject_later)} == {"pending"}
    assert store.expire_due(now=now + 11) >= 2
    for review, resolution in ((approve_later, "approve"), (reject_later, "reject")):
        expired = store.get(t, review.id)
        assert (expired.state, expired.resolution, expired.reviewer) == ("expired", resolution, "timeout")
    with pytest.raises(FailedPrecondition):
        store.resolve(t, approve_later.id, "approve", "alice")


def test_racing_reviewers_make_one_resolution(store):
    t = tenant()
    review = store.create(t, "p", "r", {}, "rev", 3600, "reject", draft={"answer": "5"})
    from concurrent.futures import ThreadPoolExecutor

    def attempt(action: str):
        try:
            return store.resolve(t, review.id, action, action + "-er")
        except FailedPrecondition:
            return None

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, ["approve", "reject", "approve", "reject"]))
    winners = {r.resolution for r in results if r is not None}
    assert len(winners) == 1
    assert store.get(t, review.id).resolution in winners


def test_rung_rows_are_written_together_newest_first(store):
    who = tenant()
    store.record_rungs([(who, "sum", "best_of_n", False, 100.0, 560, 8), (who, "sum", "beam", True, 101.0, 300, 6)])
    store.record_rungs([(who, "sum", "mcts", False, 102.0, 0, 0)])
    assert store.rung_history(who, "sum") == [("mcts", False, 0, 0), ("beam", True, 300, 6), ("best_of_n", False, 560, 8)]
    assert store.rung_history(who, "other") == []


def test_a_routes_history_holds_its_kinds_and_no_other_route_or_tenant(store):
    """What a route's other kinds lend: rows under "route/..." only, of this tenant only. A route
    named like a LIKE pattern matches itself, not its look-alikes."""
    who, other = tenant(), tenant()
    store.record_rungs([
        (who, "maths/sum", "best_of_n", False, 100.0, 560, 8),
        (who, "maths/product", "beam", True, 101.0, 300, 6),
        (who, "mathsy/sum", "best_of_n", True, 102.0, 70, 1),
        (who, "m_ths/sum", "best_of_n", True, 103.0, 70, 1),
        (other, "maths/sum", "best_of_n", True, 104.0, 70, 1),
        (who, "%/sum", "best_of_n", True, 105.0, 70, 1),
    ])
    assert store.route_history(who, "maths") == [("maths/product", ("beam", True, 300, 6)), ("maths/sum", ("best_of_n", False, 560, 8))]
    assert store.route_history(who, "%") == [("%/sum", ("best_of_n", True, 70, 1))]
    assert store.route_history(who, "m_ths") == [("m_ths/sum", ("best_of_n", True, 70, 1))]
    assert store.route_history(who, "maths", limit=1) == [("maths/product", ("beam", True, 300, 6))]


def test_each_kind_keeps_only_its_newest_rung_rows(store):
    """The prior reads a kind's newest RUNG_ROWS_KEPT attempts; older rows are deleted as new
    ones arrive, so the table does not grow without end. Other kinds and tenants keep theirs."""
    from rmesh.router_svc.reviews import RUNG_ROWS_KEPT

    who, other = tenant(), tenant()
    store.record_rungs([(who, "maths/sum", "best_of_n", i % 3 == 0, 1000.0 + i, i, 8) for i in range(RUNG_ROWS_KEPT - 10)])
    store.record_rungs([(other, "maths/sum", "beam", True, 900.0, 1, 1), (who, "maths/product", "beam", False, 950.0, 2, 2)])
    store.record_rungs([(who, "maths/sum", "best_of_n", True, 2000.0 + i, 10_000 + i, 8) for i in range(25)])
    history = store.rung_history(who, "maths/sum", limit=10 * RUNG_ROWS_KEPT)
    assert len(history) == RUNG_ROWS_KEPT
    assert history[0].tokens == 10_024 and history[-1].tokens == 15  # the 15 oldest went
    assert store.rung_history(other, "maths/sum") == [("beam", True, 1, 1)]
    assert store.rung_history(who, "maths/product") == [("beam", False, 2, 2)]
    assert [kind for kind, _ in store.route_history(who, "maths", limit=10 * RUNG_ROWS_KEPT)].count("maths/product") == 1


class CountingStore:
    """A review store that records each batch, holds writes until released, can be made to fail."""

    def __init__(self, store) -> None:
        self.store = store
        self.batches: list[int] = []
        self.release = threading.Event()
        self.fail = False

    def record_rungs(self, rows) -> None:
        self.release.wait(10)
        if self.fail:
            raise OSError("disk full")
        self.batches.append(len(rows))
        self.store.record_rungs(rows)


async def held_rung_log(tmp_path, max_pending: int) -> tuple[CountingStore, RungLog]:
    """A rung log whose writer has taken a first row and is held in the store."""
    store = CountingStore(SQLiteReviewStore(tmp_path / "reviews.sqlite3"))
    rungs = RungLog(store, max_pending=max_pending)
    await rungs.add("t", "sum", "r0", True)
    await asyncio.sleep(0.05)
    return store, rungs


async def test_rung_log_batches_rows_and_drains(tmp_path):
    store, rungs = await held_rung_log(tmp_path, max_pending=1000)
    for i in range(1, 50):
        await rungs.add("t", "sum", f"r{i}", i % 2 == 0)  # none of these waits: far below the bound
    store.release.set()
    await rungs.drain()
    # The rows that queued while r0 was being written went in one batch.
    assert store.batches == [1, 49]
    history = store.store.rung_history("t", "sum", limit=100)
    assert len(history) == 50 and history[0] == ("r49", False, 0, 0)


async def test_rung_log_makes_a_caller_wait_past_its_bound_and_survives_a_failing_store(tmp_path, caplog):
    store, rungs = await held_rung_log(tmp_path, max_pending=4)
    for i in range(1, 4):
        await rungs.add("t", "sum", f"r{i}", True)  # three queue behind it
    fourth = asyncio.create_task(rungs.add("t", "sum", "r4", True))  # the bound: it waits for its batch
    await asyncio.sleep(0.05)
    assert not fourth.done()
    store.release.set()
    await asyncio.wait_for(fourth, 10)
    await rungs.drain()
    assert store.batches == [1, 4]

    store.fail = True
    await rungs.add("t", "sum", "lost", True)
    await rungs.drain()
    assert "could not record 1 rung outcomes: disk full" in caplog.text
    store.fail = False
    await rungs.add("t", "sum", "after", True)
    await rungs.drain()
    assert store.store.rung_history("t", "sum", limit=1) == [("after", True, 0, 0)]


# -- over gRPC, through the router ----------------------------------------------------------------


async def escalate(address: str, key: str = "demo-key") -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.SolveRequest(problem="Approve a refund of 900 for order 7?", high_impact=True)
        request.evidence.update({"order": "Order 7: one desk."})
        events = [e async for e in stub.Solve(request, metadata=[("authorization", f"Bearer {key}")], timeout=30)]
    outcome = events[-1].outcome
    assert outcome.kind == router_pb2.OUTCOME_KIND_ESCALATED and outcome.review_id
    return outcome.review_id


def auth(key: str):
    return [("authorization", f"Bearer {key}")]


async def test_review_service_flow(mesh):
    review_id = await escalate(mesh.address("router"))
    async with mesh.channel() as channel:
        stub = review_pb2_grpc.ReviewServiceStub(channel)
        listed = await stub.ListReviews(review_pb2.ListReviewsRequest(state=review_pb2.REVIEW_STATE_PENDING), metadata=auth("demo-key"), timeout=5)
        assert review_id in [r.id for r in listed.reviews]
        watch = stub.WatchReview(review_pb2.WatchReviewRequest(id=review_id), metadata=auth("demo-key"), timeout=30)
        first = await watch.read()
        assert first.review.state == review_pb2.REVIEW_STATE_PENDING and first.review.evidence["order"] == "Order 7: one desk."
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ResolveReview(
                review_pb2.ResolveReviewRequest(id=review_id, action=review_pb2.REVIEW_ACTION_APPROVE), metadata=auth("demo-key"), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        resolve = review_pb2.ResolveReviewRequest(id=review_id, action=review_pb2.REVIEW_ACTION_REJECT, comment="too large")
        done = await stub.ResolveReview(resolve, metadata=auth("demo-reviewer-key"), timeout=5)
        assert done.review.state == review_pb2.REVIEW_STATE_REJECTED and done.review.reviewer == "demo-reviewer"
        assert (await stub.ResolveReview(resolve, metadata=auth("demo-reviewer-key"), timeout=5)).review == done.review
        last = await watch.read()
        assert last.review.state == review_pb2.REVIEW_STATE_REJECTED
        assert await watch.read() == grpc.aio.EOF
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ResolveReview(
                review_pb2.ResolveReviewRequest(id=review_id, action=review_pb2.REVIEW_ACTION_APPROVE), metadata=auth("demo-reviewer-key"), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetReview(review_pb2.GetReviewRequest(id="does-not-exist"), metadata=auth("demo-key"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and info.value.details().startswith("id:")


async def test_watch_streams_are_capped_per_tenant_and_a_closed_one_frees_its_place(mesh):
    from rmesh.router_svc.review_servicer import MAX_WATCHES_PER_TENANT

    review_id = await escalate(mesh.address("router"))
    async with mesh.channel() as channel:
        stub = review_pb2_grpc.ReviewServiceStub(channel)
        request = review_pb2.WatchReviewRequest(id=review_id)
        watches = [stub.WatchReview(request, metadata=auth("demo-key"), timeout=30) for _ in range(MAX_WATCHES_PER_TENANT)]
        for watch in watches:  # each one is open: it has sent the pending review
            assert (await watch.read()).review.state == review_pb2.REVIEW_STATE_PENDING
        refused = stub.WatchReview(request, metadata=auth("demo-key"), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"WatchReview: {MAX_WATCHES_PER_TENANT} streams of this tenant are open" in info.value.details()
        # The tenant's other review calls still answer, and a closed stream frees its place.
        got = await stub.GetReview(review_pb2.GetReviewRequest(id=review_id), metadata=auth("demo-key"), timeout=5)
        assert got.review.id == review_id
        watches.pop().cancel()
        for _ in range(50):
            again = stub.WatchReview(request, metadata=auth("demo-key"), timeout=30)
            try:
                assert (await again.read()).review.state == review_pb2.REVIEW_STATE_PENDING
                break
            except grpc.aio.AioRpcError as exc:  # the cancelled stream is still closing
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.1)
        else:
            pytest.fail("a closed watch never freed its place")
        for watch in [*watches, again]:
            watch.cancel()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_router_killed_mid_review_loses_nothing(mesh, tmp_path):
    """Escalate through a router process, kill it with SIGKILL, start another on the same store:
    the review is still pending and can be resolved with the CLI."""
    port = _free_port()
    env = {
        **os.environ,
        "RMESH_ROUTER_ADDR": f"127.0.0.1:{port}",
        "RMESH_SOLVER_ADDR": mesh.address("solver"),
        "RMESH_VERIFIER_ADDR": mesh.address("verifier"),
        "RMESH_REVIEW_DB": str(tmp_path / "reviews.sqlite3"),
        "RMESH_SERVICE_TOKEN": SERVICE_TOKEN,
    }
    rmesh = str(pathlib.Path(sys.executable).parent / "rmesh")

    async def start() -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(rmesh, "serve", "router", cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for _ in range(100):
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    await review_pb2_grpc.ReviewServiceStub(channel).ListReviews(review_pb2.ListReviewsRequest(), metadata=auth("demo-key"), timeout=0.5)
                return process
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        raise AssertionError("router did not start")

    first = await start()
    review_id = await escalate(f"127.0.0.1:{port}")
    first.send_signal(signal.SIGKILL)
    await first.wait()
    second = await start()
    try:
        cli = await asyncio.create_subprocess_exec(
            rmesh, "review", "--key", "demo-reviewer-key", "approve", review_id, "--comment", "ok",
            env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await cli.communicate()
        assert cli.returncode == 0, err.decode()
        assert review_id in out.decode() and "approved" in out.decode()
        cli = await asyncio.create_subprocess_exec(
            rmesh, "review", "--key", "demo-key", "list", "--state", "approved", env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await cli.communicate()
        assert review_id in out.decode()
    finally:
        second.send_signal(signal.SIGTERM)
        await second.wait()



def test_a_store_newer_than_the_router_is_refused(tmp_path):
    import sqlite3

    from rmesh.errors import ConfigError
    from rmesh.router_svc.reviews import SCHEMA_VERSION

    path = tmp_path / "future.sqlite3"
    SQLiteReviewStore(path)
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError) as info:
        SQLiteReviewStore(path)
    assert f"newer than this router's {SCHEMA_VERSION}" in str(info.value)
