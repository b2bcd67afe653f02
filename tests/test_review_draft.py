"""Human review approves a real draft: an escalated request is solved within its route's budget
first, the review holds the draft, and the caller learns the decision, either on the Solve stream
(await_review) or by reading its review with its own caller key. Real services on real ports;
the instant engine (answers "5") keeps the drafts predictable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
from asyncio.subprocess import DEVNULL, PIPE

import grpc
import pytest
import pytest_asyncio
from conftest import service_env

from rmesh.api.review.v1 import review_pb2, review_pb2_grpc
from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.engine.instant import InstantEngine
from rmesh.mesh.serve import start_services
from rmesh.peers import wait_serving
from rmesh.router_svc.policy.loader import PolicyError, parse_policy

ROOT = pathlib.Path(__file__).resolve().parent.parent
RMESH = str(pathlib.Path(sys.executable).parent / "rmesh")
OTHER_CALLER = "demo-second-caller-key"
TIMEOUT_TENANT = f"""
tenant: lenient
api_keys:
  - {{name: app, sha256: {hashlib.sha256(b"lenient-key").hexdigest()}, role: caller}}
routes:
  - name: any
    difficulty: easy
    strategies: [best_of_n]
    budget: {{max_tokens: 400, max_branches: 2, max_depth: 2, wall_clock_seconds: 30, max_tokens_per_branch: 100}}
escalate:
  - name: refunds
    when: request.problem.matches("(?i)refund")
    reason: refunds get a second look
review: {{timeout_seconds: 1, on_timeout: approve}}
"""


def auth(key: str):
    return [("authorization", f"Bearer {key}")]


@pytest_asyncio.fixture
async def router(tmp_path):
    tenants = tmp_path / "tenants"
    shutil.copytree(ROOT / "policy" / "tenants", tenants)
    demo = tenants / "demo.yaml"
    digest = hashlib.sha256(OTHER_CALLER.encode()).hexdigest()
    demo.write_text(demo.read_text().replace("api_keys:\n", f"api_keys:\n  - {{name: second-caller, sha256: {digest}, role: caller}}\n", 1))
    (tenants / "lenient.yaml").write_text(TIMEOUT_TENANT)
    services = await start_services(
        ("verifier", "solver", "router"), service_env(tmp_path, RMESH_TENANTS_DIR=str(tenants)), engine=InstantEngine()
    )
    yield f"127.0.0.1:{services[-1].port}"
    for service in reversed(services):
        await service.stop(0)


def refund(await_review: bool = False) -> router_pb2.SolveRequest:
    return router_pb2.SolveRequest(problem="Approve a refund of 900?", high_impact=True, await_review=await_review)


async def solve(address: str, request, key: str = "demo-key", timeout: float = 30) -> list:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return [e async for e in stub.Solve(request, metadata=auth(key), timeout=timeout)]


async def resolve(address: str, review_id: str, action, answer: str = "") -> review_pb2.Review:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = review_pb2_grpc.ReviewServiceStub(channel)
        request = review_pb2.ResolveReviewRequest(id=review_id, action=action, answer=answer, comment="checked")
        return (await stub.ResolveReview(request, metadata=auth("demo-reviewer-key"), timeout=5)).review


async def waiting_solve(address: str, request, key: str = "demo-key", timeout: float = 30):
    """Start a Solve that waits for its review; return the task and the review id it announced."""
    channel = grpc.aio.insecure_channel(address)
    call = router_pb2_grpc.RouterServiceStub(channel).Solve(request, metadata=auth(key), timeout=timeout)
    while True:
        event = await call.read()
        if event.WhichOneof("event") == "status" and "awaiting the decision" in event.status.message:
            review_id = event.status.message.split("review ")[1].split(":")[0]
            break

    async def rest() -> router_pb2.Outcome:
        try:
            last = None
            while (event := await call.read()) != grpc.aio.EOF:
                last = event
            return last.outcome
        finally:
            await channel.close()

    return asyncio.create_task(rest()), review_id


async def test_the_review_holds_the_draft_and_approve_releases_it_on_the_waiting_stream(router):
    task, review_id = await waiting_solve(router, refund(await_review=True))
    async with grpc.aio.insecure_channel(router) as channel:
        stub = review_pb2_grpc.ReviewServiceStub(channel)
        pending = (await stub.GetReview(review_pb2.GetReviewRequest(id=review_id), metadata=auth("demo-reviewer-key"), timeout=5)).review
    assert pending.state == review_pb2.REVIEW_STATE_PENDING and not pending.HasField("outcome")
    assert pending.draft.answer == "5" and pending.draft.checkpoints[0].text == "2 + 3 = 5"
    # The draft passed the gate only unverified; the request is high-impact.
    assert pending.draft.assurance == router_pb2.ASSURANCE_UNVERIFIED and pending.draft.usage.completion_tokens > 0
    assert pending.caller == "demo-caller"
    await resolve(router, review_id, review_pb2.REVIEW_ACTION_APPROVE)
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.kind == router_pb2.OUTCOME_KIND_RELEASED and outcome.released
    assert outcome.answer == "5" and outcome.assurance == router_pb2.ASSURANCE_HUMAN_APPROVED
    assert outcome.review_id == review_id and "approved by reviewer demo-reviewer" in outcome.reason


async def test_edit_releases_the_reviewers_text_and_reject_releases_nothing(router):
    task, review_id = await waiting_solve(router, refund(await_review=True))
    await resolve(router, review_id, review_pb2.REVIEW_ACTION_EDIT, answer="Refund of 900 approved for order 7.")
    edited = await asyncio.wait_for(task, 10)
    assert edited.released and edited.answer == "Refund of 900 approved for order 7."
    assert edited.assurance == router_pb2.ASSURANCE_HUMAN_APPROVED
    task, review_id = await waiting_solve(router, refund(await_review=True))
    await resolve(router, review_id, review_pb2.REVIEW_ACTION_REJECT)
    rejected = await asyncio.wait_for(task, 10)
    assert rejected.kind == router_pb2.OUTCOME_KIND_NO_ELIGIBLE_ANSWER and not rejected.answer
    assert rejected.assurance == router_pb2.ASSURANCE_UNSPECIFIED and "rejected by reviewer" in rejected.reason


async def test_a_waiting_stream_ends_at_its_deadline_with_the_review_still_pending(router):
    events = await solve(router, refund(await_review=True), timeout=3)
    outcome = events[-1].outcome
    assert outcome.kind == router_pb2.OUTCOME_KIND_ESCALATED and outcome.review_id
    assert "no decision before the call's deadline" in outcome.reason


async def test_the_caller_reads_the_decided_outcome_with_its_own_key_and_no_other_caller_can(router):
    outcome = (await solve(router, refund()))[-1].outcome
    assert outcome.kind == router_pb2.OUTCOME_KIND_ESCALATED
    review_id = outcome.review_id
    async with grpc.aio.insecure_channel(router) as channel:
        stub = review_pb2_grpc.ReviewServiceStub(channel)
        watch = stub.WatchReview(review_pb2.WatchReviewRequest(id=review_id), metadata=auth("demo-key"), timeout=20)
        assert (await watch.read()).review.state == review_pb2.REVIEW_STATE_PENDING
        await resolve(router, review_id, review_pb2.REVIEW_ACTION_APPROVE)
        final = (await watch.read()).review
        assert final.outcome.released and final.outcome.answer == "5"
        assert final.outcome.assurance == router_pb2.ASSURANCE_HUMAN_APPROVED
        got = (await stub.GetReview(review_pb2.GetReviewRequest(id=review_id), metadata=auth("demo-key"), timeout=5)).review
        assert got.outcome == final.outcome
        # Another caller key of the same tenant cannot see it, nor list it.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetReview(review_pb2.GetReviewRequest(id=review_id), metadata=auth(OTHER_CALLER), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListReviews(review_pb2.ListReviewsRequest(), metadata=auth(OTHER_CALLER), timeout=5)
        assert review_id not in [r.id for r in listed.reviews]
        listed = await stub.ListReviews(review_pb2.ListReviewsRequest(), metadata=auth("demo-reviewer-key"), timeout=5)
        assert review_id in [r.id for r in listed.reviews]


async def test_on_timeout_approve_releases_the_draft_only_at_the_routes_minimum(router):
    plain = router_pb2.SolveRequest(problem="Please refund order 7", await_review=True)
    outcome = (await solve(router, plain, key="lenient-key", timeout=20))[-1].outcome
    assert outcome.released and outcome.answer == "5" and outcome.assurance == router_pb2.ASSURANCE_UNVERIFIED
    assert "released unreviewed" in outcome.reason
    # The caller marks it high-impact: an unverified draft is never released without a person.
    high = router_pb2.SolveRequest(problem="Please refund order 7", await_review=True, high_impact=True)
    outcome = (await solve(router, high, key="lenient-key", timeout=20))[-1].outcome
    assert outcome.kind == router_pb2.OUTCOME_KIND_NO_ELIGIBLE_ANSWER and not outcome.answer
    assert "minimum assurance" in outcome.reason


def test_lint_refuses_on_timeout_approve_beside_a_high_impact_rule():
    text = TIMEOUT_TENANT.replace("reason: refunds get a second look", "reason: refunds get a second look\n    high_impact: true")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "lenient.yaml")
    assert info.value.rule == "review.on_timeout" and "escalate refunds" in info.value.reason
    assert info.value.line == text.splitlines().index("review: {timeout_seconds: 1, on_timeout: approve}") + 1


async def test_the_readmes_review_commands_end_to_end(tmp_path):
    """As the README shows it, on `rmesh serve` with the shipped tenants and the embedded model:
    a high-impact request waits on its stream, a reviewer edits it with `rmesh review`, and the
    waiting `rmesh solve` prints the released answer."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RMESH_")},
        "RMESH_ROUTER_ADDR": f"127.0.0.1:{free_port()}",
        "RMESH_SOLVER_ADDR": f"127.0.0.1:{free_port()}",
        "RMESH_VERIFIER_ADDR": f"127.0.0.1:{free_port()}",
        "RMESH_REVIEW_DB": str(tmp_path / "reviews.sqlite3"),
    }
    server = await asyncio.create_subprocess_exec(RMESH, "serve", cwd=ROOT, env=env, stdout=DEVNULL, stderr=DEVNULL)
    try:
        await wait_serving(env["RMESH_ROUTER_ADDR"], 120)
        # Before any request escalates, the listing says so, on stderr: stdout stays empty.
        empty = await asyncio.create_subprocess_exec(
            RMESH, "review", "--key", "demo-key", "list", "--state", "pending", cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(empty.communicate(), 60)
        assert (empty.returncode, out) == (0, b"") and "no pending reviews for this key's tenant" in err.decode()
        solving = await asyncio.create_subprocess_exec(
            RMESH, "solve", "--problem", "Approve a refund of 900?", "--high-impact", "--await-review", "--timeout", "600",
            "--json", cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE,
        )
        review_id = ""
        for _ in range(600):
            listing = await run(RMESH, "review", "--key", "demo-key", "--json", "list", "--state", "pending", env=env)
            pending = [json.loads(line) for line in listing.splitlines() if line.startswith("{")]
            if pending:
                review_id = pending[0]["id"]
                break
            await asyncio.sleep(0.2)
        assert review_id
        shown = await run(RMESH, "review", "--key", "demo-reviewer-key", "show", review_id, env=env)
        assert "draft:" in shown
        await run(RMESH, "review", "--key", "demo-reviewer-key", "edit", review_id, "--answer", "Refund 450.", "--comment", "partial", env=env)
        stdout, stderr = await asyncio.wait_for(solving.communicate(), 60)
        outcome = json.loads(stdout.decode().strip().splitlines()[-1])
        assert solving.returncode == 0, stderr.decode()
        assert outcome["released"] and outcome["answer"] == "Refund 450." and outcome["assurance"] == "ASSURANCE_HUMAN_APPROVED"
        assert outcome["review_id"] == review_id
    finally:
        server.terminate()
        await server.wait()


async def run(*command: str, env: dict) -> str:
    process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
