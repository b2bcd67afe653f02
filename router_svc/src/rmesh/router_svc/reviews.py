"""Durable human review: a store on SQLite (WAL, the default) or PostgreSQL.

Every write is one transaction; resolving locks the row (``BEGIN IMMEDIATE`` on SQLite,
``SELECT … FOR UPDATE`` on PostgreSQL), so two reviewers racing on one review produce one
resolution. Nothing is held in memory: a router killed mid-review loses nothing.
"""

from __future__ import annotations

import json
import pathlib
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace

from rmesh.errors import ConfigError, FailedPrecondition, InvalidRequest, NotFound, Unavailable
from rmesh.router_svc.ladder import Attempt

PENDING, APPROVED, EDITED, REJECTED, EXPIRED = "pending", "approved", "edited", "rejected", "expired"
ACTION_STATES = {"approve": APPROVED, "edit": EDITED, "reject": REJECTED}

# Versioned schema: each step runs once, in order, in one transaction; the version reached is
# kept in schema_version. Steps are idempotent, so a store created before versioning (whose
# tables already exist) migrates too.
_MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "reviews and the prior's rung outcomes", [
        """CREATE TABLE IF NOT EXISTS reviews (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            state TEXT NOT NULL,
            problem TEXT NOT NULL,
            reason TEXT NOT NULL,
            evidence TEXT NOT NULL,
            policy_revision TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            on_timeout TEXT NOT NULL,
            resolved_at DOUBLE PRECISION,
            reviewer TEXT NOT NULL DEFAULT '',
            comment TEXT NOT NULL DEFAULT '',
            answer TEXT NOT NULL DEFAULT '',
            resolution TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX IF NOT EXISTS reviews_by_tenant ON reviews (tenant, state, created_at)",
        """CREATE TABLE IF NOT EXISTS rung_outcomes (
            tenant TEXT NOT NULL,
            kind TEXT NOT NULL,
            rung TEXT NOT NULL,
            success INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS rung_outcomes_by_kind ON rung_outcomes (tenant, kind, created_at)",
    ]),
    (2, "drafts and the caller of each review", [
        "ALTER TABLE reviews ADD COLUMN IF NOT EXISTS caller TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE reviews ADD COLUMN IF NOT EXISTS draft TEXT NOT NULL DEFAULT '{}'",
    ]),
    (3, "the tokens and samples of each rung attempt (the prior's cost and Best-of-N's rate)", [
        "ALTER TABLE rung_outcomes ADD COLUMN IF NOT EXISTS tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE rung_outcomes ADD COLUMN IF NOT EXISTS samples INTEGER NOT NULL DEFAULT 0",
    ]),
    (4, "the route of each rung attempt, indexed: what a route's other kinds lend a kind's prior "
        "(older rows keep an empty route and lend nothing)", [
        "ALTER TABLE rung_outcomes ADD COLUMN IF NOT EXISTS route TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX IF NOT EXISTS rung_outcomes_by_route ON rung_outcomes (tenant, route, created_at)",
    ]),
]
SCHEMA_VERSION = _MIGRATIONS[-1][0]
# Rung attempts kept per tenant and kind: at least what the router's prior reads (HISTORY_LIMIT).
RUNG_ROWS_KEPT = 200
_COLUMNS = (
    "id, tenant, state, problem, reason, evidence, policy_revision, created_at, expires_at, "
    "on_timeout, resolved_at, reviewer, comment, answer, resolution, caller, draft"
)


@dataclass(frozen=True)
class Review:
    id: str
    tenant: str
    state: str
    problem: str
    reason: str
    evidence: dict[str, str] = field(default_factory=dict)
    policy_revision: str = ""
    created_at: float = 0.0
    expires_at: float = 0.0
    on_timeout: str = "reject"
    resolved_at: float | None = None
    reviewer: str = ""
    comment: str = ""
    answer: str = ""
    resolution: str = ""  # the action that resolved it, for idempotency
    caller: str = ""  # the caller key whose request was escalated
    # What the search produced before escalation (answer, checkpoints, checks, assurance, ...).
    draft: dict = field(default_factory=dict)

    @classmethod
    def from_row(cls, row) -> "Review":
        values = list(row)
        values[5] = json.loads(values[5])
        values[16] = json.loads(values[16] or "{}")
        return cls(*values)


class ReviewStore:
    """SQL shared by both backends; subclasses open connections and lock rows."""

    placeholder = "?"

    def _sql(self, text: str) -> str:
        return text.replace("?", self.placeholder)

    @contextmanager
    def _transaction(self):  # pragma: no cover - each backend provides one
        raise NotImplementedError
        yield

    def _lock_clause(self) -> str:
        return ""

    def close(self) -> None:
        """Release connections (PostgreSQL's pool); SQLite holds none between calls."""

    def create(
        self,
        tenant: str,
        problem: str,
        reason: str,
        evidence: dict[str, str],
        policy_revision: str,
        timeout_seconds: float,
        on_timeout: str,
        now: float | None = None,
        caller: str = "",
        draft: dict | None = None,
    ) -> Review:
        now = time.time() if now is None else now
        review = Review(
            id=uuid.uuid4().hex,
            tenant=tenant,
            state=PENDING,
            problem=problem,
            reason=reason,
            evidence=dict(evidence),
            policy_revision=policy_revision,
            created_at=now,
            expires_at=now + timeout_seconds,
            on_timeout=on_timeout,
            caller=caller,
            draft=dict(draft or {}),
        )
        with self._transaction() as cur:
            cur.execute(
                self._sql(f"INSERT INTO reviews ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (
                    review.id, review.tenant, review.state, review.problem, review.reason, json.dumps(review.evidence),
                    review.policy_revision, review.created_at, review.expires_at, review.on_timeout, None, "", "", "", "",
                    review.caller, json.dumps(review.draft),
                ),
            )
        return review

    def get(self, tenant: str, review_id: str, caller: str | None = None) -> Review:
        """One review of ``tenant``; with ``caller``, only if that caller key's request made it."""
        query = f"SELECT {_COLUMNS} FROM reviews WHERE id = ? AND tenant = ?"
        args: list = [review_id, tenant]
        if caller is not None:
            query += " AND caller = ?"
            args.append(caller)
        with self._transaction() as cur:
            cur.execute(self._sql(query), args)
            row = cur.fetchone()
        if row is None:
            # Another tenant's review is indistinguishable from none at all.
            raise NotFound(f"id: no review {review_id!r}")
        return Review.from_row(row)

    def list(self, tenant: str, state: str = "", limit: int = 100, caller: str | None = None) -> list[Review]:
        query = f"SELECT {_COLUMNS} FROM reviews WHERE tenant = ?"
        args: list = [tenant]
        if caller is not None:
            query += " AND caller = ?"
            args.append(caller)
        if state:
            query += " AND state = ?"
            args.append(state)
        query += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        with self._transaction() as cur:
            cur.execute(self._sql(query), args)
            return [Review.from_row(r) for r in cur.fetchall()]

    def resolve(
        self,
        tenant: str,
        review_id: str,
        action: str,
        reviewer: str,
        answer: str = "",
        comment: str = "",
        now: float | None = None,
    ) -> Review:
        if action not in ACTION_STATES:
            raise InvalidRequest("action", f"must be one of {', '.join(ACTION_STATES)}")
        if action == "edit" and not answer.strip():
            raise InvalidRequest("answer", "an edit needs the replacement answer")
        answer = answer if action == "edit" else ""
        now = time.time() if now is None else now
        with self._transaction() as cur:
            cur.execute(
                self._sql(f"SELECT {_COLUMNS} FROM reviews WHERE id = ? AND tenant = ?{self._lock_clause()}"),
                (review_id, tenant),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"id: no review {review_id!r}")
            review = Review.from_row(row)
            if review.state == PENDING and review.expires_at <= now:
                review = self._expire(cur, review, now)
            if review.state == PENDING and action == "approve" and not str(review.draft.get("answer", "")).strip():
                raise FailedPrecondition(
                    f"id: review {review_id} has no draft answer to approve; EDIT with an answer or REJECT"
                )
            if review.state != PENDING:
                if review.resolution == action and review.answer == answer and review.state != EXPIRED:
                    return review  # the same resolution again is the same resolution
                raise FailedPrecondition(
                    f"id: review {review_id} is already {review.state}"
                    + (f" ({review.resolution} by {review.reviewer})" if review.reviewer else "")
                )
            resolved = replace(
                review, state=ACTION_STATES[action], resolved_at=now, reviewer=reviewer, comment=comment,
                answer=answer, resolution=action,
            )
            cur.execute(
                self._sql(
                    "UPDATE reviews SET state = ?, resolved_at = ?, reviewer = ?, comment = ?, answer = ?, resolution = ? "
                    "WHERE id = ?"
                ),
                (resolved.state, now, reviewer, comment, answer, action, review_id),
            )
        return resolved

    def _expire(self, cur, review: Review, now: float) -> Review:
        expired = replace(review, state=EXPIRED, resolved_at=now, reviewer="timeout", resolution=review.on_timeout)
        cur.execute(
            self._sql("UPDATE reviews SET state = ?, resolved_at = ?, reviewer = ?, resolution = ? WHERE id = ? AND state = ?"),
            (EXPIRED, now, "timeout", review.on_timeout, review.id, PENDING),
        )
        return expired

    def expire_due(self, now: float | None = None) -> int:
        """Expire every pending review past its deadline with its tenant's chosen outcome."""
        now = time.time() if now is None else now
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "UPDATE reviews SET state = ?, resolved_at = ?, reviewer = 'timeout', resolution = on_timeout "
                    "WHERE state = ? AND expires_at <= ?"
                ),
                (EXPIRED, now, PENDING, now),
            )
            return cur.rowcount

    # -- the router's learned prior: which rung of a ladder succeeds for a tenant's task kind --
    def record_rungs(self, rows: Sequence[tuple[str, str, str, bool, float, int, int]]) -> None:
        """Many (tenant, kind, rung, success, when, tokens, samples) attempts in one transaction.
        A kind is keyed "route/kind" (route names hold no "/"): the route is kept apart too.
        Each kind keeps its newest RUNG_ROWS_KEPT rows; older ones are deleted with the batch
        (the prior never reads past them, and a route's history is drawn from its kinds')."""
        with self._transaction() as cur:
            cur.executemany(
                self._sql(
                    "INSERT INTO rung_outcomes (tenant, kind, rung, success, created_at, tokens, samples, route) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                [
                    (tenant, kind, rung, 1 if success else 0, when, int(tokens), int(samples), kind.partition("/")[0] if "/" in kind else "")
                    for tenant, kind, rung, success, when, tokens, samples in rows
                ],
            )
            cur.executemany(
                self._sql(
                    "DELETE FROM rung_outcomes WHERE tenant = ? AND kind = ? AND created_at < ("
                    "SELECT created_at FROM rung_outcomes WHERE tenant = ? AND kind = ? "
                    "ORDER BY created_at DESC LIMIT 1 OFFSET ?)"
                ),
                [(tenant, kind, tenant, kind, RUNG_ROWS_KEPT - 1) for tenant, kind in {(row[0], row[1]) for row in rows}],
            )

    def rung_history(self, tenant: str, kind: str, limit: int = RUNG_ROWS_KEPT) -> list[Attempt]:
        """The most recent rung attempts for this tenant and kind, newest first."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT rung, success, tokens, samples FROM rung_outcomes WHERE tenant = ? AND kind = ? "
                    "ORDER BY created_at DESC LIMIT ?"
                ),
                (tenant, kind, limit),
            )
            return [Attempt(rung, bool(success), int(tokens), int(samples)) for rung, success, tokens, samples in cur.fetchall()]

    def route_history(self, tenant: str, route: str, limit: int = RUNG_ROWS_KEPT) -> list[tuple[str, Attempt]]:
        """The most recent rung attempts of every kind on one of this tenant's routes, newest
        first, each with its kind: what the route's other kinds lend a kind's prior."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT kind, rung, success, tokens, samples FROM rung_outcomes "
                    "WHERE tenant = ? AND route = ? ORDER BY created_at DESC LIMIT ?"
                ),
                (tenant, route, limit),
            )
            return [
                (kind, Attempt(rung, bool(success), int(tokens), int(samples)))
                for kind, rung, success, tokens, samples in cur.fetchall()
            ]

    def pending_count(self) -> int:
        with self._transaction() as cur:
            cur.execute(self._sql("SELECT COUNT(*) FROM reviews WHERE state = ?"), (PENDING,))
            return int(cur.fetchone()[0])


class SQLiteReviewStore(ReviewStore):
    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = str(path)
        pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
        with self._transaction() as cur:
            cur.execute("PRAGMA user_version")
            version = cur.fetchone()[0]
            _check_version(version)
            for number, _, steps in _MIGRATIONS:
                if number <= version:
                    continue
                for step in steps:
                    if "ADD COLUMN IF NOT EXISTS" in step:
                        # SQLite has no ADD COLUMN IF NOT EXISTS: look first.
                        table, column = step.split()[2], step.split("IF NOT EXISTS ")[1].split()[0]
                        cur.execute(f"PRAGMA table_info({table})")
                        if column in {row[1] for row in cur.fetchall()}:
                            continue
                        step = step.replace(" IF NOT EXISTS", "")
                    cur.execute(step)
            cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.schema_version = SCHEMA_VERSION

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        connection.execute("PRAGMA busy_timeout = 10000")
        connection.execute("PRAGMA synchronous = FULL")
        return connection

    @contextmanager
    def _transaction(self):
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            cursor = connection.cursor()
            try:
                yield cursor
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        finally:
            connection.close()


def _check_version(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"RMESH_REVIEW_DB: the review store's schema is version {version}, newer than this router's "
            f"{SCHEMA_VERSION}; run a router at least as new as the one that wrote it"
        )


class PostgresReviewStore(ReviewStore):
    """PostgreSQL through a connection pool (connect and checkout time out in seconds, not
    minutes); a store that cannot be reached is UNAVAILABLE, never a hang."""

    placeholder = "%s"
    # Serialises migrations between routers starting together.
    _MIGRATION_LOCK = 7_414_200_001

    def __init__(self, url: str, pool_size: int = 10, timeout: float = 5.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._psycopg = psycopg
        self._unreachable = (psycopg.OperationalError, PoolTimeout)
        self.url = url
        connect_timeout = max(1, int(timeout))
        # One direct connection first: a wrong URL or password fails at once with its own reason.
        with psycopg.connect(url, connect_timeout=connect_timeout) as connection:
            self._migrate(connection)
        self.pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=timeout, kwargs={"connect_timeout": connect_timeout},
            open=False, name="rmesh-reviews",
        )
        self.pool.open(wait=True, timeout=max(timeout, 10.0))

    def _migrate(self, connection) -> None:
        with connection.transaction(), connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (self._MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT max(version) FROM schema_version")
            version = cur.fetchone()[0] or 0
            _check_version(version)
            for number, _, steps in _MIGRATIONS:
                if number > version:
                    for step in steps:
                        cur.execute(step)
            cur.execute("DELETE FROM schema_version")
            cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
        self.schema_version = SCHEMA_VERSION

    def _lock_clause(self) -> str:
        return " FOR UPDATE"

    @contextmanager
    def _transaction(self):
        try:
            with self.pool.connection() as connection:
                with connection.transaction():
                    with connection.cursor() as cursor:
                        yield cursor
        except self._unreachable as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise Unavailable(f"review store unavailable: {reason[:200]}") from None

    def close(self) -> None:
        self.pool.close()


def open_store(url: str) -> ReviewStore:
    """``postgresql://…`` for PostgreSQL; ``sqlite:///path`` or a plain path for SQLite. A store
    that cannot be opened is a ConfigError naming RMESH_REVIEW_DB (never its password)."""
    try:
        if url.startswith(("postgresql://", "postgres://")):
            return PostgresReviewStore(url)
        return SQLiteReviewStore(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
    except Exception as exc:
        parts = urllib.parse.urlsplit(url)
        shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}" if parts.scheme.startswith("postgres") else url
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"RMESH_REVIEW_DB={shown}: cannot open the review store ({reason})") from None
