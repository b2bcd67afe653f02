"""One hop of the bare baseline chain: a grpc.aio server streaming a trivial response.

``python -m bench.chain --port P --next ADDR`` forwards each call to the next hop and streams
its messages back; without ``--next`` it is the last hop and answers with ``--messages`` small
messages. No auth, no policy, no tracing: what three grpc.aio processes cost on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

SERVICE, METHOD = "bench.Chain", "Stream"
PATH = f"/{SERVICE}/{METHOD}"


async def serve(port: int, next_address: str | None, messages: int) -> None:
    channel = grpc.aio.insecure_channel(next_address) if next_address else None
    call_next = channel.unary_stream(PATH) if channel else None

    async def stream(request: bytes, context):
        if call_next is None:
            for i in range(messages):
                yield b"event %d" % i
            return
        async for message in call_next(request):
            yield message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_stream_rpc_method_handler(stream)}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    if channel:
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--next", dest="next_address")
    parser.add_argument("--messages", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.next_address, args.messages))


if __name__ == "__main__":
    main()
