"""The gRPC edge shared by the three services: status mapping, deadlines, servers, channels.

Cores raise ``rmesh.errors`` exceptions; this module turns them into precise gRPC statuses
(with a google.rpc QuotaFailure detail for quota errors) and turns statuses received from a
downstream service back into the same exceptions.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterable

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters

from rmesh import errors
from rmesh.config import ServerSettings
from rmesh.solving import CALL_DEADLINE

log = logging.getLogger("rmesh.grpc")

# Absolute time.monotonic() by which the current call must finish; None when unbounded. It lives
# with the ports (rmesh.solving) so a core can narrow it for one downstream call.
DEADLINE = CALL_DEADLINE

_CODES: list[tuple[type[errors.MeshError], grpc.StatusCode]] = [
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
]


def status_code(error: errors.MeshError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, error: errors.MeshError) -> None:
    """End the call with the status that fits ``error``; never returns."""
    code = status_code(error)
    if isinstance(error, errors.ResourceExhausted) and error.violations:
        detail = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                for v in error.violations
            ]
        )
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=error.message)
        status.details.add().Pack(detail)
        await context.abort_with_status(rpc_status.to_status(status))
    await context.abort(code, error.message)


async def abort_internal(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """An unexpected failure: logged with its traceback, reported as INTERNAL, never UNKNOWN."""
    log.error("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def unary_edge(handler):
    """Map the project's errors to statuses for a unary servicer method (one place, not a
    try/except in every method); unexpected failures become INTERNAL, never UNKNOWN."""

    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            return await handler(self, request, context)
        except errors.MeshError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_internal(context, exc)

    return wrapped


def begin_call(context: grpc.aio.ServicerContext) -> float | None:
    """Record the caller's deadline for downstream calls; return it as a monotonic time."""
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    DEADLINE.set(deadline)
    return deadline


def remaining_timeout() -> float | None:
    """Seconds left for a downstream call (gRPC Python does not propagate deadlines)."""
    deadline = DEADLINE.get()
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.DeadlineExceeded("deadline passed before the downstream call")
    return left


def error_from_rpc(exc: grpc.aio.AioRpcError, service: str) -> errors.MeshError:
    """Map a downstream status back to the project's exceptions, keeping its message."""
    return _error_from_status(exc.code(), exc.details() or "", service)


def error_from_peer(exc: BaseException, service: str) -> errors.MeshError:
    """What a peer's failure becomes when the peer runs in this process: exactly what the same
    failure would become after crossing gRPC (``error_from_rpc``), so callers see one mesh."""
    if isinstance(exc, errors.ResourceExhausted):
        return errors.ResourceExhausted(f"{service}: {exc.message}", exc.violations)
    if isinstance(exc, errors.MeshError):
        return _error_from_status(status_code(exc), exc.message, service)
    log.error("internal error in %s", service, exc_info=exc)
    return _error_from_status(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}", service)


def _error_from_status(code: grpc.StatusCode, details: str, service: str) -> errors.MeshError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, reason = details.partition(": ")
        return errors.InvalidRequest(field, reason) if reason else errors.InvalidRequest(service, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded(f"{service}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.ResourceExhausted(f"{service}: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return errors.FailedPrecondition(f"{service}: {details}")
    return errors.Unavailable(f"{service} unavailable: {code.name}: {details}")


def _options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the call can be refused precisely."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, whatever the runtime raises it as
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


def _refuse_undecodable(behaviour, streaming: bool):
    """gRPC answers a request that fails to parse with UNKNOWN; callers get INVALID_ARGUMENT."""

    def message(request: _Undecodable) -> str:
        return (
            f"request: not a valid message ({request.reason}); look for invalid UTF-8 in a string "
            "field, nesting deeper than 100 levels, or truncated bytes"
        )

    if streaming and inspect.isasyncgenfunction(behaviour):
        async def stream(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message(request))
            async for item in behaviour(request, context):
                yield item

        return stream
    # A unary call, or a stream written with context.write (health's Watch): a coroutine.

    async def unary(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message(request))
        return await behaviour(request, context)

    return unary


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Refuse requests whose bytes are not a valid message with INVALID_ARGUMENT (for example a
    string field holding invalid UTF-8), instead of the UNKNOWN gRPC would send."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(
                request_deserializer=_tolerant(handler.request_deserializer),
                unary_unary=_refuse_undecodable(handler.unary_unary, streaming=False),
            )
        if handler.unary_stream is not None:
            return handler._replace(
                request_deserializer=_tolerant(handler.request_deserializer),
                unary_stream=_refuse_undecodable(handler.unary_stream, streaming=True),
            )
        return handler


SERVICE_TOKEN_HEADER = "x-rmesh-service-token"
# Open without the token: probes need health, and reflection describes only the public protos.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _refuse(handler, message: str):
    """``handler`` with its behaviour replaced by an UNAUTHENTICATED refusal of the same shape
    (the server tells unary from streaming, and sync from async, by the function it is given)."""

    async def unary_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def unary_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - never reached: abort raises

    async def stream_unary(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - never reached: abort raises

    for kind, refusal in (
        ("unary_unary", unary_unary), ("unary_stream", unary_stream),
        ("stream_unary", stream_unary), ("stream_stream", stream_stream),
    ):
        if getattr(handler, kind) is not None:
            return handler._replace(**{kind: refusal})
    return handler


class ServiceTokenInterceptor(grpc.aio.ServerInterceptor):
    """An inner service (solver, verifier) answers only the mesh: every call but health and
    reflection must carry the shared service token. Compared in constant time."""

    def __init__(self, service: str, token: str) -> None:
        self.service = service
        self.token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_PREFIXES):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(SERVICE_TOKEN_HEADER)
        if sent is None:
            return _refuse(
                handler,
                f"{SERVICE_TOKEN_HEADER}: missing; the {self.service} answers only the mesh's own services "
                "(a service token, or a mesh client certificate)",
            )
        if not hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self.token):
            return _refuse(handler, f"{SERVICE_TOKEN_HEADER}: not the mesh's service token")
        return handler


def inner_service_guard(service: str, settings: ServerSettings) -> list[grpc.aio.ServerInterceptor]:
    """What fences an inner service in. Fail closed: with neither mesh TLS nor a service token
    the service refuses to start rather than answer anyone."""
    if settings.mesh_tls is None and not settings.service_token:
        raise errors.ConfigError(
            f"RMESH_SERVICE_TOKEN: the {service} answers only the mesh's services; set a shared service token "
            "(or RMESH_MESH_TLS_CERT, RMESH_MESH_TLS_KEY and RMESH_MESH_TLS_CA for mutual TLS)"
        )
    return [ServiceTokenInterceptor(service, settings.service_token)] if settings.service_token else []


def _server_credentials(settings: ServerSettings, inner: bool) -> grpc.ServerCredentials | None:
    if inner and settings.mesh_tls is not None:
        tls = settings.mesh_tls
        # The TLS handshake refuses a peer without a certificate the mesh CA signed.
        return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True)
    if not inner and settings.public_tls is not None:
        cert, key = settings.public_tls
        return grpc.ssl_server_credentials([(key, cert)])
    return None


def create_server(
    address: str,
    settings: ServerSettings,
    add_servicers: Callable[[grpc.aio.Server], Iterable[str]],
    tracer_provider=None,
    inner: str = "",
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer, list[str]]:
    """A grpc.aio server with health, reflection, tracing and message limits; not started.
    ``inner`` names an inner service (solver, verifier): only the mesh may call it. Returns the
    server, its bound port, its health servicer and the service names added."""
    guard = inner_service_guard(inner, settings) if inner else []
    server = grpc.aio.server(
        interceptors=[
            *guard,
            MalformedRequestInterceptor(),
            # Health checks stay out of traces (probes every few seconds), and out of the
            # tracing wrapper, which would turn health's context.write Watch into UNKNOWN.
            aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(filters.health_check())),
        ],
        options=_options(settings),
    )
    service_names = list(add_servicers(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    credentials = _server_credentials(settings, bool(inner))
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return server, port, health_servicer, service_names


def create_health_server(address: str, health_servicer) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with only ``health_servicer``: for probes that cannot speak mesh TLS."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return server, port


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health_servicer.set(name, status)


async def graceful_stop(server: grpc.aio.Server, health_servicer, names: Iterable[str], grace: float) -> None:
    """Report NOT_SERVING first so balancers drain, then stop with a grace period."""
    await set_serving(health_servicer, names, False)
    await server.stop(grace)


def _service_config(retry_services: Iterable[str]) -> str:
    # Only calls that are safe to repeat are retried: the verifier's are pure functions.
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": s} for s in retry_services],
                    "retryPolicy": {
                        "maxAttempts": 3,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "0.5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def create_channel(
    address: str, settings: ServerSettings, retry_services: Iterable[str] = (), tracer_provider=None
) -> grpc.aio.Channel:
    # A peer that restarts (a rollout, a moved container) is found again within seconds: gRPC's
    # reconnect backoff otherwise grows to two minutes while the peer is away.
    # Round robin over every address the name resolves to (a headless Service: every pod); one
    # address behaves as before.
    options: list[tuple[str, object]] = [
        *_options(settings), ("grpc.max_reconnect_backoff_ms", 5000), ("grpc.lb_policy_name", "round_robin")
    ]
    retry = list(retry_services)
    if retry:
        options += [("grpc.service_config", _service_config(retry)), ("grpc.enable_retries", 1)]
    interceptors = list(aio_client_interceptors(tracer_provider=tracer_provider))
    if settings.service_token:
        interceptors += service_token_interceptors(settings.service_token)
    if settings.mesh_tls is not None:
        tls = settings.mesh_tls
        credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(SERVICE_TOKEN_HEADER, token)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


def service_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that present the mesh's service token on every call."""

    class Unary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(_with_token(details, token), request)

    class Stream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(_with_token(details, token), request)

    return [Unary(), Stream()]
