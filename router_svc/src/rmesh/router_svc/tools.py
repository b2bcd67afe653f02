"""Evidence tools: the required evidence a request lacks, fetched from its tenant's own tools.

A tenant's policy declares each tool (``policy.model.Tool``): the keys it provides, its
endpoint (a gRPC ``EvidenceToolService`` or an HTTP JSON endpoint), a CEL expression that builds
its arguments from the request, a timeout, how many calls one request may make, a cache TTL and
the credential it is called with. Only the tenant's own tools are ever called for its requests,
with that credential and never the caller's key.

What a tool returns is data, held to the rules caller evidence is held to: declared keys only,
string values within the size limits, no control characters. A tool that breaks a rule fails
as a whole; nothing it sent is used. The values never reach a log, a span or a progress event;
provenance records the tool, the time and the value's SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
from http.cookiejar import DefaultCookiePolicy
import json
import logging
import pathlib
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from opentelemetry import trace
from prometheus_client import Counter

from rmesh.api.tools.v1 import tools_pb2, tools_pb2_grpc
from rmesh.router_svc.policy.cel import LazyVariables, to_activation, tool_arguments
from rmesh.router_svc.policy.model import TenantPolicy, Tool

log = logging.getLogger("rmesh.router.tools")

TOOL_CALLS = Counter("rmesh_tool_calls", "Evidence tool calls, by tenant, tool and result", ["tenant", "tool", "result"])

# What a tool may return: the limits caller evidence has (router core), and a bound on the
# response itself so a tool cannot make the router buffer without end.
MAX_VALUE_CHARS = 16_000
MAX_TOTAL_CHARS = 64_000
MAX_RESPONSE_BYTES = 256 * 1024
CACHE_ENTRIES_PER_TENANT = 1024
MAX_CREDENTIAL_BYTES = 4096
# A call never starts with less time than this before the caller's deadline.
MIN_CALL_SECONDS = 0.05
# Pause before calling an unavailable tool again, times the attempts so far.
RETRY_PAUSE_SECONDS = 0.2
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
CALLER = "caller"


class ToolFailure(Exception):
    """A tool call that produced nothing usable. ``reason`` is safe to show the caller."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result  # the metric's result label
        self.reason = reason


@dataclass(frozen=True)
class Fetched:
    """What one tool returned for one request."""

    tool: str
    values: dict[str, str]
    fetched_at: float  # Unix time the tool answered (for a cache hit, when it first answered)
    millis: int
    cache_hit: bool = False

    def describe(self) -> str:
        how = "from cache" if self.cache_hit else f"in {self.millis} ms"
        return f"fetched {', '.join(sorted(self.values))} from {self.tool} {how}"


@dataclass(frozen=True)
class Provenance:
    """Where one evidence value came from."""

    key: str
    source: str  # CALLER or a tool's name
    fetched_at: float = 0.0
    sha256: str = ""

    @classmethod
    def of(cls, key: str, value: str, source: str = CALLER, fetched_at: float = 0.0, hashed: bool = True) -> Provenance:
        """``hashed``: False for a key the tenant marks sensitive, whose hash would give a
        short value away."""
        return cls(key, source, fetched_at, hashlib.sha256(value.encode()).hexdigest() if hashed else "")


@dataclass(frozen=True)
class Filled:
    """The outcome of one round of fetching: what arrived, and why each key still missing is."""

    fetched: tuple[Fetched, ...]
    failures: dict[str, str]  # missing key -> "tool: reason" (or why no tool was called)

    @property
    def values(self) -> dict[str, str]:
        return {k: v for f in self.fetched for k, v in f.values.items()}


class EvidenceTools:
    """Calls tenants' evidence tools, with a per-tenant cache and one HTTP client and one gRPC
    channel per endpoint."""

    def __init__(self, secrets_dir: str | pathlib.Path = "", tracer: trace.Tracer | None = None) -> None:
        self._secrets = pathlib.Path(secrets_dir) if secrets_dir else None
        self._tracer = tracer or trace.get_tracer("rmesh.router.tools")
        # Per tenant, so one tenant's lookups never evict another's answers.
        self._caches: dict[str, OrderedDict[tuple, tuple[float, Fetched]]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._http: httpx.AsyncClient | None = None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def fill(
        self, policy: TenantPolicy, view: Mapping[str, Any], missing: Sequence[str], deadline: float | None
    ) -> Filled:
        """Ask the tenant's tools for the ``missing`` keys, in parallel, within ``deadline`` (a
        monotonic time). Each key goes to the first tool, in the policy's order, that provides
        it."""
        assigned: dict[str, list[str]] = {}
        failures: dict[str, str] = {}
        for key in missing:
            tool = next((t for t in policy.tools if key in t.provides), None)
            if tool is None:
                failures[key] = "no tool provides it"
            else:
                assigned.setdefault(tool.name, []).append(key)
        if not assigned:
            return Filled((), failures)
        tools = {t.name: t for t in policy.tools}
        variables = LazyVariables(policy.variables, view)
        present = set(view.get("evidence", {}))
        calls = [self._fetch(policy.tenant, tools[name], keys, variables, present, deadline) for name, keys in assigned.items()]
        results = await asyncio.gather(*calls, return_exceptions=True)
        fetched: list[Fetched] = []
        for (name, keys), result in zip(assigned.items(), results):
            if isinstance(result, ToolFailure):
                failures.update({key: f"{name}: {result.reason}" for key in keys})
            elif isinstance(result, BaseException):
                log.error("tenant %s: tool %s failed unexpectedly (%s)", policy.tenant, name, type(result).__name__)
                failures.update({key: f"{name}: failed" for key in keys})
            else:
                fetched.append(result)
                failures.update({key: f"{name}: did not return it" for key in keys if key not in result.values})
        return Filled(tuple(fetched), failures)

    async def _fetch(
        self, tenant: str, tool: Tool, keys: list[str], variables: LazyVariables, present: set[str], deadline: float | None
    ) -> Fetched:
        with self._tracer.start_as_current_span(f"tool {tool.name}") as span:
            span.set_attributes({"rmesh.tenant": tenant, "rmesh.tool.name": tool.name, "rmesh.tool.keys": ",".join(keys)})
            started = time.monotonic()
            try:
                result = await self._fetch_once(tenant, tool, keys, variables, present, deadline)
            except ToolFailure as failure:
                span.set_attributes({"rmesh.tool.result": failure.result, "rmesh.tool.cache_hit": False})
                span.set_status(trace.Status(trace.StatusCode.ERROR, failure.reason))
                TOOL_CALLS.labels(tenant=tenant, tool=tool.name, result=failure.result).inc()
                log.warning("tenant %s: tool %s: %s", tenant, tool.name, failure.reason)
                raise
            finally:
                span.set_attribute("rmesh.tool.latency_ms", int((time.monotonic() - started) * 1000))
            outcome = "cache_hit" if result.cache_hit else "ok"
            span.set_attributes({"rmesh.tool.result": outcome, "rmesh.tool.cache_hit": result.cache_hit})
            TOOL_CALLS.labels(tenant=tenant, tool=tool.name, result=outcome).inc()
            return result

    async def _fetch_once(
        self, tenant: str, tool: Tool, keys: list[str], variables: LazyVariables, present: set[str], deadline: float | None
    ) -> Fetched:
        try:
            arguments = tool_arguments(
                tool.arguments.evaluate(to_activation(variables.request, variables.values_for(tool.arguments))), f"tool {tool.name}"
            )
        except Exception:
            # Most often the expression reads evidence the caller did not send (an order id):
            # the reason names those keys, from the policy, never a value.
            absent = sorted(tool.evidence_read - present)
            if absent:
                raise ToolFailure("bad_arguments", f"the request has no {', '.join(absent)} to build its arguments from") from None
            raise ToolFailure("bad_arguments", "its arguments could not be built from the request") from None
        cache = self._caches.setdefault(tenant, OrderedDict())
        cache_key = (tool.name, tool.endpoint, tuple(sorted(arguments.items())))
        cached = cache.get(cache_key)
        if cached is not None and time.monotonic() < cached[0] and all(k in cached[1].values for k in keys):
            cache.move_to_end(cache_key)
            hit = cached[1]
            return Fetched(tool.name, {k: hit.values[k] for k in keys}, hit.fetched_at, 0, cache_hit=True)
        credential = await asyncio.to_thread(self._credential, tenant, tool)
        started = time.monotonic()
        last: ToolFailure | None = None
        for attempt in range(tool.max_calls):
            if attempt:
                await asyncio.sleep(min(RETRY_PAUSE_SECONDS * attempt, max(0.0, (deadline or float("inf")) - time.monotonic() - MIN_CALL_SECONDS)))
            timeout = tool.timeout_seconds
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
            if timeout < MIN_CALL_SECONDS:
                raise last or ToolFailure("deadline", "no time was left before the request's deadline")
            try:
                raw = await self._call(tenant, tool, arguments, keys, credential, timeout)
                break
            except ToolFailure as failure:
                last = failure
                if failure.result not in ("unavailable",):
                    raise
        else:
            raise last or ToolFailure("unavailable", "unavailable")
        values = _validated(tool, raw)
        fetched = Fetched(tool.name, {k: v for k, v in values.items() if k in keys}, time.time(), int((time.monotonic() - started) * 1000))
        if tool.cache_ttl_seconds > 0:
            cache[cache_key] = (time.monotonic() + tool.cache_ttl_seconds, Fetched(tool.name, values, fetched.fetched_at, 0))
            cache.move_to_end(cache_key)
            while len(cache) > CACHE_ENTRIES_PER_TENANT:
                cache.popitem(last=False)
        return fetched

    def _credential(self, tenant: str, tool: Tool) -> str:
        """The tool's credential: the operator's file <secrets dir>/<tenant>/<name>, read at each
        call (a mounted Secret may be rotated). A tenant reaches only its own directory (tenant
        and secret names are single path components, by the policy schema). A tool that names a
        credential it cannot read is not called: fail closed."""
        if not tool.credential:
            return ""
        value = ""
        if self._secrets is not None:
            try:
                with open(self._secrets / tenant / tool.credential, "rb") as file:
                    raw = file.read(MAX_CREDENTIAL_BYTES + 1)
                if len(raw) <= MAX_CREDENTIAL_BYTES:
                    value = raw.decode("utf-8").strip()
            except (OSError, UnicodeDecodeError):
                value = ""
        if not value or _CONTROL.search(value) or "\n" in value or "\r" in value:
            where = self._secrets / tenant / tool.credential if self._secrets is not None else "(no RMESH_TOOL_SECRETS_DIR)"
            log.error("tenant %s: tool %s: its credential %s is missing, unreadable, empty or over %d bytes", tenant, tool.name, where, MAX_CREDENTIAL_BYTES)
            raise ToolFailure("no_credential", "its credential is not set up")
        return value

    async def _call(
        self, tenant: str, tool: Tool, arguments: dict[str, str], keys: list[str], credential: str, timeout: float
    ) -> Any:
        scheme, _, rest = tool.endpoint.partition("://")
        if scheme in ("grpc", "grpcs"):
            return await self._call_grpc(scheme, rest, tenant, arguments, keys, credential, timeout)
        return await self._call_http(tool.endpoint, tenant, arguments, keys, credential, timeout)

    async def _call_grpc(
        self, scheme: str, target: str, tenant: str, arguments: dict[str, str], keys: list[str], credential: str, timeout: float
    ) -> dict[str, str]:
        endpoint = f"{scheme}://{target}"
        channel = self._channels.get(endpoint)
        if channel is None:
            # Reconnect soon after a tool comes back: the default backoff (1 s, growing to 120 s)
            # would fail calls fast for minutes after one outage.
            options = [
                ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                ("grpc.enable_retries", 0),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ]
            if scheme == "grpcs":
                channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
            self._channels[endpoint] = channel
        stub = tools_pb2_grpc.EvidenceToolServiceStub(channel)
        metadata = [("authorization", f"Bearer {credential}")] if credential else []
        request = tools_pb2.FetchRequest(arguments=arguments, keys=keys, tenant=tenant)
        try:
            response = await stub.Fetch(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ToolFailure("timeout", f"timed out after {timeout:.1f} s") from None
            if code == grpc.StatusCode.UNAVAILABLE:
                log.warning("tenant %s: tool at %s is unavailable", tenant, endpoint)
                raise ToolFailure("unavailable", "unavailable") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise ToolFailure("too_large", f"sent a response over {MAX_RESPONSE_BYTES} bytes") from None
            said = _CONTROL.sub("", exc.details() or "")[:200]
            raise ToolFailure("error", f"answered {code.name}" + (f": {said}" if said else "")) from None
        return dict(response.evidence)

    async def _call_http(
        self, url: str, tenant: str, arguments: dict[str, str], keys: list[str], credential: str, timeout: float
    ) -> Any:
        if self._http is None:
            # No redirects: a tool cannot send the router (and its credential) elsewhere. No
            # cookies: one tenant's tool session must never reach another tenant's tool.
            self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
            self._http.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        # Uncompressed only, read raw: the size limit bounds what the router holds, not what a
        # compressed body would expand to.
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if credential:
            headers["authorization"] = f"Bearer {credential}"
        body = {"arguments": arguments, "keys": keys, "tenant": tenant}
        try:
            async with asyncio.timeout(timeout):
                async with self._http.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 500 or response.status_code == 429:
                        raise ToolFailure("unavailable", "unavailable")
                    if response.status_code != 200:
                        raise ToolFailure("error", f"answered HTTP {response.status_code}")
                    data = bytearray()
                    async for chunk in response.aiter_raw():
                        data += chunk
                        if len(data) > MAX_RESPONSE_BYTES:
                            raise ToolFailure("too_large", f"sent a response over {MAX_RESPONSE_BYTES} bytes")
        except TimeoutError:
            raise ToolFailure("timeout", f"timed out after {timeout:.1f} s") from None
        except httpx.TimeoutException:
            raise ToolFailure("timeout", f"timed out after {timeout:.1f} s") from None
        except httpx.HTTPError:
            raise ToolFailure("unavailable", "unavailable") from None
        try:
            document = json.loads(bytes(data))
        except (UnicodeDecodeError, ValueError):
            raise ToolFailure("malformed", "returned malformed JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("evidence"), dict):
            raise ToolFailure("malformed", 'returned JSON without an "evidence" object')
        return document["evidence"]


def _validated(tool: Tool, evidence: Any) -> dict[str, str]:
    """The tool's answer held to the rules caller evidence follows; any breach fails it whole."""
    out: dict[str, str] = {}
    for key, value in evidence.items():
        if key not in tool.provides:
            named = repr(key) if _KEY.fullmatch(key) else "a key"
            raise ToolFailure("undeclared_key", f"answered for {named}, which it does not declare")
        if not isinstance(value, str):
            raise ToolFailure("not_a_string", f"returned {key} as {value_kind(value)}, not a string")
        if len(value) > MAX_VALUE_CHARS:
            raise ToolFailure("too_large", f"returned {key} longer than {MAX_VALUE_CHARS} characters")
        if _CONTROL.search(value):
            raise ToolFailure("malformed", f"returned {key} with a control character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ToolFailure("malformed", f"returned {key} that is not valid UTF-8") from None
        out[key] = value
    if sum(len(v) for v in out.values()) > MAX_TOTAL_CHARS:
        raise ToolFailure("too_large", f"returned more than {MAX_TOTAL_CHARS} characters in all")
    return out


def value_kind(value: Any) -> str:
    """A JSON value's kind, as messages name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
