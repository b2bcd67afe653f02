"""The asyncio client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import grpc

from rmesh.api.review.v1 import review_pb2, review_pb2_grpc
from rmesh.api.router.v1 import router_pb2, router_pb2_grpc
from rmesh.client.options import ClientOptions
from rmesh.client.requests import build_request, event_of, resolve_request, review_state


class AsyncMeshClient:
    """One channel to the router; close it with ``await close()`` or ``async with``."""

    def __init__(self, address: str | None = None, *, options: ClientOptions | None = None, **settings: Any) -> None:
        """``address`` (default: ``options.address``, else 127.0.0.1:50051) and keyword
        settings override the fields of ``options``."""
        if address is not None:
            settings["address"] = address
        self.options = replace(options or ClientOptions(), **settings)
        o = self.options
        if o.secure:
            self._channel = grpc.aio.secure_channel(o.address, o.credentials(), options=o.channel_options())
        else:
            self._channel = grpc.aio.insecure_channel(o.address, options=o.channel_options())
        self._router = router_pb2_grpc.RouterServiceStub(self._channel)
        self._reviews = review_pb2_grpc.ReviewServiceStub(self._channel)

    async def __aenter__(self) -> "AsyncMeshClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _timeout(self, timeout: float | None) -> float:
        return self.options.timeout if timeout is None else timeout

    async def solve(
        self,
        problem: str | router_pb2.SolveRequest | Mapping[str, Any],
        *,
        kind: str = "",
        checks: Sequence[Mapping[str, Any]] = (),
        evidence: Mapping[str, str] | None = None,
        high_impact: bool = False,
        await_review: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[router_pb2.StatusEvent | router_pb2.ConfigEvent | router_pb2.ProgressEvent | router_pb2.Outcome]:
        """Stream the request's events; the last one is its Outcome. Leaving the loop early
        cancels the call on the router."""
        request = build_request(
            problem, kind=kind, checks=checks, evidence=evidence, high_impact=high_impact, await_review=await_review
        )
        call = self._router.Solve(request, metadata=self.options.metadata(), timeout=self._timeout(timeout))
        try:
            async for message in call:
                yield event_of(message)
        finally:
            call.cancel()

    async def outcome(self, problem, **kwargs: Any) -> router_pb2.Outcome:
        """Solve and return only the Outcome."""
        last = None
        async for event in self.solve(problem, **kwargs):
            last = event
        if not isinstance(last, router_pb2.Outcome):
            raise RuntimeError("the stream ended without an outcome")
        return last

    async def list_reviews(self, state: str | None = None, limit: int = 0, timeout: float | None = None) -> list[review_pb2.Review]:
        request = review_pb2.ListReviewsRequest(state=review_state(state), limit=limit)
        reply = await self._reviews.ListReviews(request, metadata=self.options.metadata(), timeout=self._timeout(timeout))
        return list(reply.reviews)

    async def get_review(self, review_id: str, timeout: float | None = None) -> review_pb2.Review:
        request = review_pb2.GetReviewRequest(id=review_id)
        reply = await self._reviews.GetReview(request, metadata=self.options.metadata(), timeout=self._timeout(timeout))
        return reply.review

    async def watch_review(self, review_id: str, timeout: float | None = None) -> AsyncIterator[review_pb2.Review]:
        """The review now, then each change until it is resolved or expires."""
        call = self._reviews.WatchReview(
            review_pb2.WatchReviewRequest(id=review_id), metadata=self.options.metadata(), timeout=self._timeout(timeout)
        )
        try:
            async for message in call:
                yield message.review
        finally:
            call.cancel()

    async def resolve_review(
        self, review_id: str, action: str, *, answer: str = "", comment: str = "", timeout: float | None = None
    ) -> review_pb2.Review:
        """``action`` is approve, edit (with ``answer``) or reject; needs a reviewer key."""
        request = resolve_request(review_id, action, answer, comment)
        reply = await self._reviews.ResolveReview(request, metadata=self.options.metadata(), timeout=self._timeout(timeout))
        return reply.review
