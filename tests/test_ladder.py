"""Compute-optimal escalation: the prior picks the starting rung; failures climb the ladder."""

from __future__ import annotations


from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.router_svc.ladder import plan

LADDER = ("single_pass", "best_of_n", "beam")


def test_no_history_starts_cheap():
    assert plan(LADDER, []).start == 0 and plan(LADDER, []).escalate


def test_a_rung_that_rarely_succeeds_is_skipped():
    history = [("single_pass", False)] * 5 + [("best_of_n", True)] * 3 + [("best_of_n", False)] * 2
    chosen = plan(LADDER, history)
    assert chosen.start == 1 and "skip single_pass: 0/5" in chosen.why and "3/5" in chosen.why


def test_a_rung_that_succeeds_often_enough_is_kept():
    history = [("single_pass", True)] + [("single_pass", False)] * 4
    assert plan(LADDER, history).start == 0


def test_hopeless_kind_gets_one_cheap_attempt_and_no_escalation():
    ladder = ("single_pass", "best_of_n")
    two_requests = [("best_of_n", False), ("single_pass", False)] * 2
    assert plan(ladder, two_requests).escalate, "two failed requests are not enough evidence"
    four_requests = two_requests * 2
    chosen = plan(ladder, four_requests)
    assert (chosen.start, chosen.escalate) == (0, False)
    assert "failed the last 4 requests" in chosen.why
    assert plan(ladder, [("best_of_n", True)] + four_requests).escalate  # one success keeps it alive


async def test_failed_rung_escalates_and_progress_shows_it(mesh):
    """9 + 8 + 2 defeats best_of_n's greedy and samples: the router climbs to beam and says so."""
    request = router_pb2.SolveRequest(problem="What is 9 + 8 + 2?")
    request.task.kind = "arithmetic-escalation-test"
    request.task.checks.add(name="arithmetic").params.update({"expression": "9 + 8 + 2"})
    async with mesh.channel() as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        events = [e async for e in stub.Solve(request, metadata=[("authorization", "Bearer demo-key")], timeout=180)]
    config = events[1].config
    assert "ladder best_of_n > beam" in config.reason and "no history" in config.reason
    stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
    outcome = events[-1].outcome
    if not outcome.released or outcome.strategy == "beam":
        assert "escalate best_of_n -> beam" in stages
        escalation = next(e.progress for e in events if e.WhichOneof("event") == "progress" and e.progress.stage.startswith("escalate"))
        later = [e.progress for e in events if e.WhichOneof("event") == "progress"][-1]
        assert later.usage.completion_tokens >= escalation.usage.completion_tokens > 0
    await mesh.services["router"].core.drain()
    history = mesh.services["router"].reviews.rung_history("demo", "arithmetic-escalation-test")
    assert history and history[-1][0] == "best_of_n"


def test_a_one_rung_ladder_with_history_says_so():
    assert plan(["best_of_n"], [("best_of_n", False)] * 6).why == "start at best_of_n, the only rung"
