"""The live policy: an immutable snapshot of every tenant, swapped whole on reload.

A reload validates each changed file; a file that fails keeps its last good version serving
(a broken file never replaces a good one). The store remembers the last reload's result and
time for health and for operators.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pathlib
import time
from dataclasses import dataclass, field

from rmesh.errors import FailedPrecondition, PermissionDenied, Unauthenticated
from rmesh.router_svc.policy.loader import PolicyError, load_policy
from rmesh.router_svc.policy.model import ApiKey, TenantPolicy

log = logging.getLogger("rmesh.router_svc.policy")


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    policies: dict[str, TenantPolicy]  # by tenant
    files: dict[str, str]  # path -> revision it holds
    keys: dict[str, tuple[TenantPolicy, ApiKey]]


@dataclass
class ReloadStatus:
    ok: bool = True
    when: float = 0.0
    errors: list[str] = field(default_factory=list)
    reloads: int = 0
    failures: int = 0


def _snapshot(policies: dict[str, TenantPolicy], files: dict[str, str]) -> Snapshot:
    keys = {k.sha256: (p, k) for p in policies.values() for k in p.keys}
    return Snapshot(policies, files, keys)


class PolicyStore:
    def __init__(self, directory: str | pathlib.Path) -> None:
        self.directory = pathlib.Path(directory)
        self.status = ReloadStatus()
        self._snapshot = _snapshot({}, {})
        self._by_file: dict[str, TenantPolicy] = {}
        self._seen: dict[str, str] = {}  # path -> content hash last looked at
        self._failed: dict[str, str] = {}  # path -> why its current content was refused
        if not self.directory.is_dir():
            raise FailedPrecondition(f"tenant directory {self.directory} does not exist (set --tenants or RMESH_TENANTS_DIR)")
        self.reload()
        if self.status.errors and not self._by_file:
            raise FailedPrecondition("no valid tenant file: " + "; ".join(self.status.errors))

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def reload(self) -> ReloadStatus:
        """Validate changed files and swap in a new snapshot; keep good versions of broken files."""
        errors: list[str] = []
        by_file = dict(self._by_file)
        present = {str(p): p for p in sorted(self.directory.glob("*.yaml"))}
        for name in list(by_file):
            if name not in present:
                del by_file[name]
        for name in list(self._failed):
            if name not in present:
                del self._failed[name]
        for name, path in present.items():
            try:
                content = path.read_bytes()
            except OSError as exc:
                errors.append(f"{name}: {exc.strerror}")
                continue
            digest = hashlib.sha256(content).hexdigest()
            if self._seen.get(name) == digest:
                if name in self._failed:
                    errors.append(self._failed[name])  # still broken: keep saying so
                continue
            self._seen[name] = digest
            try:
                by_file[name] = load_policy(path)
                self._failed.pop(name, None)
            except PolicyError as exc:
                self._failed[name] = exc.message
                errors.append(exc.message)
                log.error("tenant file refused, last good version keeps serving: %s", exc.message)
            except Exception as exc:  # a file must never stop the reload of the others
                message = f"{name}: could not be loaded ({type(exc).__name__}: {str(exc)[:200]})"
                self._failed[name] = message
                errors.append(message)
                log.error("tenant file refused, last good version keeps serving: %s", message)
        tenants: dict[str, TenantPolicy] = {}
        for name, policy in sorted(by_file.items()):
            if policy.tenant in tenants:
                errors.append(f"{name}: tenant {policy.tenant!r} is already defined in {tenants[policy.tenant].source}")
                continue
            tenants[policy.tenant] = policy
        self._by_file = by_file
        self._snapshot = _snapshot(tenants, {n: p.revision for n, p in by_file.items()})
        self.status = ReloadStatus(
            ok=not errors,
            when=time.time(),
            errors=errors,
            reloads=self.status.reloads + 1,
            failures=self.status.failures + (1 if errors else 0),
        )
        return self.status

    def authenticate(self, authorization: str | None, role: str = "caller") -> tuple[TenantPolicy, ApiKey]:
        if not authorization:
            raise Unauthenticated("authorization metadata is missing; send 'Bearer <api key>'")
        key = authorization.strip()
        if key.lower().startswith("bearer "):
            key = key[7:].strip()
        found = self._snapshot.keys.get(hash_key(key))
        if found is None:
            raise Unauthenticated("authorization: unknown API key")
        if found[1].role != role:
            raise PermissionDenied(f"authorization: key {found[1].name!r} has role {found[1].role!r}, not {role!r}")
        return found

    async def watch(self, interval: float = 1.0, on_change=None) -> None:
        """Poll the directory for changes until cancelled. Reloads run on the event loop, the
        same thread that evaluates decisions (the CEL runner is not thread-safe); an unchanged
        directory costs well under a millisecond."""
        while True:
            await asyncio.sleep(interval)
            before = self._snapshot
            try:
                status = self.reload()
            except Exception:
                log.exception("reloading %s failed; the live policy is unchanged, retrying", self.directory)
                continue
            if on_change and (self._snapshot is not before):
                await on_change(status)
