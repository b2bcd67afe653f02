"""A small fulfillment tool server: the evidence the seed's support ticket needs, by order id.

It implements the mesh's evidence tool contract (proto/rmesh/api/tools/v1/tools.proto): one
Fetch call, arguments in (``order_id``), evidence out (``order``, ``carrier``,
``return_policy``). The demo tenant declares it as its ``fulfillment`` tool, so a support
request that carries only an order id is answered with this evidence, fetched and cited:

    python examples/tools/fulfillment_server.py          # 127.0.0.1:50070
    make run                                             # in another shell
    .venv/bin/rmesh solve --file examples/fulfillment-by-order-id.yaml

Calls must carry ``authorization: Bearer TOKEN``, TOKEN being $RMESH_DEMO_TOOL_TOKEN, else the
public development value demo-tool-token, which ``make run`` writes where the demo tenant's
policy finds it (.rmesh/tool-secrets/demo/fulfillment).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os

import grpc

from rmesh.api.tools.v1 import tools_pb2, tools_pb2_grpc

DEV_TOKEN = "demo-tool-token"  # public, for local use only, like the demo tenant's keys

ORDERS = {
    "1042": {
        "order": "Order 1042: laptop, monitor stand and cable, express; the stand shipped separately and was delivered.",
        "carrier": "Laptop and cable are at the regional hub; estimated delivery tomorrow.",
        "return_policy": "Opened accessories such as stands may be returned within 30 days.",
    },
    "2077": {
        "order": "Order 2077: one desk lamp, standard shipping; not yet shipped.",
        "carrier": "No tracking yet: the lamp leaves the warehouse in two days.",
        "return_policy": "Lamps may be returned unopened within 14 days.",
    },
}


class Fulfillment(tools_pb2_grpc.EvidenceToolServiceServicer):
    def __init__(self, token: str) -> None:
        self.token = token

    async def Fetch(self, request: tools_pb2.FetchRequest, context: grpc.aio.ServicerContext) -> tools_pb2.FetchResponse:
        presented = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(presented.encode(), f"Bearer {self.token}".encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid bearer token is required")
        order_id = request.arguments.get("order_id", "")
        record = ORDERS.get(order_id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "arguments.order_id: no such order")
        return tools_pb2.FetchResponse(evidence={k: record[k] for k in request.keys if k in record})


async def serve(host: str, port: int, token: str) -> None:
    server = grpc.aio.server()
    tools_pb2_grpc.add_EvidenceToolServiceServicer_to_server(Fulfillment(token), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"fulfillment tool serving on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50070)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve(args.host, args.port, os.environ.get("RMESH_DEMO_TOOL_TOKEN") or DEV_TOKEN))


if __name__ == "__main__":
    main()
