"""The project's one error hierarchy.

Cores raise these; the gRPC edge (rmesh.grpc_edge) maps each to a status code. Every error
carries structured fields so the edge can build a precise message and, for quota errors, a
google.rpc QuotaFailure detail.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class MeshError(Exception):
    """Base class: a failure the caller can be told about precisely."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(MeshError):
    """The request is malformed; ``field`` names the offending field path."""

    def __init__(self, field_path: str, reason: str) -> None:
        super().__init__(f"{field_path}: {reason}")
        self.field = field_path
        self.reason = reason


class Unauthenticated(MeshError):
    """No API key, or one that no tenant holds."""


@dataclass
class QuotaViolation:
    subject: str
    description: str


class ResourceExhausted(MeshError):
    """A budget or quota would be exceeded."""

    def __init__(self, message: str, violations: list[QuotaViolation] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or []


class DeadlineExceeded(MeshError):
    """The request's time ran out; engine work was cancelled."""


class Unavailable(MeshError):
    """A dependency (engine, solver, verifier) cannot be reached."""


class PermissionDenied(MeshError):
    """The caller is known but may not do this."""


class NotFound(MeshError):
    """No such object, or not one the caller may see."""


class FailedPrecondition(MeshError):
    """The system is not in a state to serve the request (for example, a broken config)."""


@dataclass(frozen=True)
class Cancelled(Exception):
    """Raised inside engines when a job's cancel flag is set or its deadline passes."""

    reason: str = "cancelled"
    partial: object | None = field(default=None, compare=False)


class ConfigError(Exception):
    """A service cannot start: a setting, file, model or package it needs is missing or wrong.

    The message is one line naming what is missing and how to supply it; a service's entry
    point prints it and exits non-zero instead of starting with a traceback.
    """
