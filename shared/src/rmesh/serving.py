"""Running services: start a gRPC server with health, serve until SIGTERM, stop gracefully.

Each service's ``serve`` module builds its own server with :func:`start_server`; the service's
console script hands its start function to :func:`main`, which turns a missing setting, file,
model or package into one line on stderr and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from rmesh import grpc_edge, metrics
from rmesh.config import ServerSettings, address_setting
from rmesh.errors import ConfigError, MeshError
from rmesh.telemetry import tracer_provider

log = logging.getLogger("rmesh.serve")
EXIT_CONFIG = 2
# The health entry liveness probes read: SERVING while the process runs.
LIVENESS_HEALTH = "rmesh.live"


@dataclass
class RunningService:
    name: str
    server: grpc.aio.Server
    port: int
    health: object
    service_names: list[str]
    provider: TracerProvider
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    engine: object = None  # an engine the service owns and closes on stop
    tasks: list[asyncio.Task] = field(default_factory=list)
    policies: object = None
    reviews: object = None
    core: object = None  # the service's core; a router's pending writes are drained on stop
    health_server: grpc.aio.Server | None = None  # the plaintext health-only port, if any

    async def stop(self, grace: float) -> None:
        for task in self.tasks:
            task.cancel()
        await grpc_edge.graceful_stop(self.server, self.health, self.service_names, grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if hasattr(self.core, "drain"):
            await self.core.drain()
        if hasattr(self.core, "close"):
            await self.core.close()
        for channel in self.channels:
            await channel.close()
        if hasattr(self.reviews, "close"):
            await asyncio.to_thread(self.reviews.close)
        if self.engine is not None:
            await self.engine.aclose()
        self.provider.shutdown()


async def start_server(
    name: str,
    address: str,
    settings: ServerSettings,
    provider: TracerProvider,
    add: Callable[[grpc.aio.Server], list[str]],
    inner: bool = False,
) -> RunningService:
    """Bind ``address``, register the servicers ``add`` puts on the server, and mark them SERVING.
    An ``inner`` service (solver, verifier) answers only the mesh's own services."""
    server, port, health, names = grpc_edge.create_server(
        address, settings, add, tracer_provider=provider, inner=name if inner else ""
    )
    health_server = None
    if settings.health_address:
        health_server, _ = grpc_edge.create_health_server(settings.health_address, health)
    await server.start()
    service = RunningService(name, server, port, health, names, provider)
    # Liveness, apart from readiness: a solver whose engine is away is alive, only not ready.
    await health.set(LIVENESS_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    if health_server is not None:
        await health_server.start()
        service.health_server = health_server
    await grpc_edge.set_serving(health, names, True)
    if inner and settings.mesh_tls is not None:
        security = "mutual TLS: only mesh certificates"
    elif inner:
        security = "plaintext: only callers with the mesh's service token"
    else:
        security = "TLS" if settings.public_tls is not None else "plaintext"
    log.info("%s serving on %s (port %d, %s)", name, address, port, security)
    return service


def bound_address(address: str, port: int) -> str:
    """The address clients should use once a server bound ``address`` (port 0 picks one)."""
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


def provider_factory(
    env: Mapping[str, str], extra_processors: list[SpanProcessor] | None = None
) -> Callable[[str], TracerProvider]:
    """One tracer provider per service, named ``<RMESH_SERVICE_NAME_PREFIX>-<service>``."""
    prefix = env.get("RMESH_SERVICE_NAME_PREFIX", "rmesh")
    return lambda name: tracer_provider(f"{prefix}-{name}", env, extra_processors)


StartFn = Callable[[Mapping[str, str]], Awaitable[list[RunningService]]]


async def run_forever(start: StartFn, env: Mapping[str, str]) -> None:
    """Serve until SIGINT or SIGTERM, then drain: NOT_SERVING first, then stop with grace."""
    settings = ServerSettings.load(env)
    if env.get("RMESH_METRICS_ADDR"):
        address = address_setting(env, "RMESH_METRICS_ADDR", "")
        try:
            port = metrics.serve_metrics(address)
        except OSError as exc:
            raise ConfigError(f"RMESH_METRICS_ADDR={address}: cannot listen ({exc.strerror or exc})") from None
        log.info("metrics on http://%s:%d/metrics", address.rpartition(":")[0], port)
    services = await start(env)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("ready: %s; Ctrl-C or SIGTERM to stop", ", ".join(s.name for s in services))
    await stop.wait()
    log.info("stopping (grace %.0fs)", settings.grace_seconds)
    # Callers first: a router stops before its solver so no new work reaches the solver.
    for service in reversed(services):
        await service.stop(settings.grace_seconds)
    log.info("stopped")


def main(prog: str, start: StartFn, env: Mapping[str, str] | None = None) -> int:
    """Run ``start`` until a signal; a start-up problem is one line on stderr and exit code 2."""
    env = dict(os.environ if env is None else env)
    # Until the event loop takes over, SIGTERM stops start-up like Ctrl-C does. Without this a
    # container's PID 1 ignores SIGTERM (the kernel drops it when no handler is set) while a
    # model loads, and is only killed when the stop timeout runs out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per engine call
    try:
        asyncio.run(run_forever(start, env))
    except KeyboardInterrupt:
        pass
    except (ConfigError, MeshError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RuntimeError as exc:
        # grpc raises RuntimeError when it cannot bind the address.
        if "bind" not in str(exc).lower() and "port" not in str(exc).lower():
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def service_cli(prog: str, description: str, address_variable: str, argv: list[str] | None, start_module: str) -> int:
    """The console script of a service with one command, ``serve``; ``start_module`` names
    the module whose ``start`` builds the service (imported only once the arguments parse)."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help=f"serve on ${address_variable} until SIGTERM")
    parser.parse_args(argv)
    return main(prog, importlib.import_module(start_module).start)
