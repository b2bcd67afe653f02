"""One hop of the bare baseline chain: a grpc.aio server streaming a trivial response.

``python -m bench.chain --port P --next ADDR`` forwards each call to the next hop and streams
its messages back; without ``--next`` it is the last hop and answers with ``--messages`` small
messages. ``--check ADDR`` makes the hop also call that hop's unary ``Check`` method
``--checks-before`` times before it streams and ``--checks-after`` times after, so a chain can
make the same gRPC calls per request as the mesh: the split mesh's five are client to router,
router to verifier, router to solver, solver to verifier, router to verifier. No auth, no
policy, no tracing: what grpc.aio processes cost on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

SERVICE, METHOD, CHECK = "bench.Chain", "Stream", "Check"
PATH = f"/{SERVICE}/{METHOD}"
CHECK_PATH = f"/{SERVICE}/{CHECK}"


async def serve(
    port: int, next_address: str | None, messages: int, check_address: str | None = None, before: int = 0, after: int = 0
) -> None:
    channel = grpc.aio.insecure_channel(next_address) if next_address else None
    call_next = channel.unary_stream(PATH) if channel else None
    check_channel = grpc.aio.insecure_channel(check_address) if check_address else None
    call_check = check_channel.unary_unary(CHECK_PATH) if check_channel else None

    async def checks(count: int, request: bytes) -> None:
        for _ in range(count if call_check else 0):
            await call_check(request)

    async def stream(request: bytes, context):
        await checks(before, request)
        if call_next is None:
            for i in range(messages):
                yield b"event %d" % i
        else:
            async for message in call_next(request):
                yield message
        await checks(after, request)

    async def check(request: bytes, context) -> bytes:
        return b"passed"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(
            SERVICE,
            {METHOD: grpc.unary_stream_rpc_method_handler(stream), CHECK: grpc.unary_unary_rpc_method_handler(check)},
        ),
    ))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    for open_channel in (channel, check_channel):
        if open_channel:
            await open_channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--next", dest="next_address")
    parser.add_argument("--messages", type=int, default=4)
    parser.add_argument("--check", dest="check_address", help="the hop whose Check this one calls")
    parser.add_argument("--checks-before", type=int, default=0)
    parser.add_argument("--checks-after", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.next_address, args.messages, args.check_address, args.checks_before, args.checks_after))


if __name__ == "__main__":
    main()
