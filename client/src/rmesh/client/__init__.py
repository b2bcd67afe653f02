"""A Python client for Reasoning Mesh: stream a Solve, then read and resolve human reviews.

    from rmesh.client import MeshClient

    with MeshClient("127.0.0.1:50051", api_key="demo-key") as mesh:
        for event in mesh.solve("What is 17 * 23?", checks=[{"name": "arithmetic", "params": {"expression": "17*23"}}]):
            print(type(event).__name__, event)

``solve`` yields the typed events of the stream (``StatusEvent``, ``ConfigEvent``,
``ProgressEvent``) and ends with exactly one ``Outcome``. ``AsyncMeshClient`` is the same API
for asyncio. Failures raise ``grpc.RpcError`` with the status the mesh sent (INVALID_ARGUMENT
names the field, RESOURCE_EXHAUSTED carries the quota, ...). The client depends only on grpcio,
protobuf and the mesh's generated API.
"""

from rmesh.client.aio import AsyncMeshClient
from rmesh.client.options import ClientOptions
from rmesh.client.requests import build_request
from rmesh.client.sync import MeshClient
from rmesh.api.review.v1.review_pb2 import Review
from rmesh.api.router.v1.router_pb2 import ConfigEvent, Outcome, ProgressEvent, StatusEvent

Event = StatusEvent | ConfigEvent | ProgressEvent | Outcome

__all__ = [
    "AsyncMeshClient",
    "ClientOptions",
    "ConfigEvent",
    "Event",
    "MeshClient",
    "Outcome",
    "ProgressEvent",
    "Review",
    "StatusEvent",
    "build_request",
]
