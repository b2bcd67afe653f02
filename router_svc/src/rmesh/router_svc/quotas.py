"""Per-tenant admission: a cap on concurrent Solve calls and a token quota per time window.

``Admission`` keeps the ledgers in this router's memory (one router, the SQLite default);
``SharedAdmission`` keeps them in PostgreSQL, so the caps hold across every router replica.

A request reserves its whole token budget when admitted and is reconciled with what it really
used when it ends, so concurrent requests can never overspend the window between them. The
request reports its use as it goes: whether it ends in an answer, an error, a cancel or a
deadline, it is charged what it used by then, never its whole reservation; branches that were
still decoding when it ended count at their token cap (the engine may have spent it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from rmesh.errors import QuotaViolation, ResourceExhausted, Unavailable
from rmesh.router_svc.policy.model import Quotas

log = logging.getLogger("rmesh.router")


@dataclass
class _Ledger:
    active: int = 0
    reserved: int = 0
    spent: deque = field(default_factory=deque)  # (time, tokens)
    spent_total: int = 0  # the sum of ``spent``, kept as entries come and go

    def used(self, now: float, window: float) -> int:
        while self.spent and self.spent[0][0] <= now - window:
            self.spent_total -= self.spent.popleft()[1]
        return self.spent_total

    def spend(self, when: float, tokens: int) -> None:
        self.spent.append((when, tokens))
        self.spent_total += tokens


class Admission:
    """Reservations per tenant; the asyncio loop is single-threaded, so no lock is needed."""

    def __init__(self, clock=time.monotonic) -> None:
        self._ledgers: dict[str, _Ledger] = {}
        self._clock = clock

    def ledger(self, tenant: str) -> _Ledger:
        return self._ledgers.setdefault(tenant, _Ledger())

    @asynccontextmanager
    async def admit(self, tenant: str, quotas: Quotas, tokens: int):
        """Reserve ``tokens``; yields a callback the request calls with what it has used so far."""
        ledger = self.ledger(tenant)
        now = self._clock()
        if ledger.active >= quotas.max_concurrent:
            raise ResourceExhausted(
                f"tenant {tenant}: {ledger.active} Solve calls in flight, the cap is {quotas.max_concurrent}",
                [QuotaViolation(f"tenant:{tenant}:concurrent_solves", f"cap {quotas.max_concurrent}")],
            )
        used = ledger.used(now, quotas.window_seconds)
        if used + ledger.reserved + tokens > quotas.tokens_per_window:
            raise ResourceExhausted(
                f"tenant {tenant}: token quota of {quotas.tokens_per_window} per {quotas.window_seconds:.0f}s "
                f"would be exceeded ({used} used, {ledger.reserved} reserved, {tokens} asked)",
                [QuotaViolation(f"tenant:{tenant}:tokens_per_window", f"{quotas.tokens_per_window} per {quotas.window_seconds:.0f}s")],
            )
        ledger.active += 1
        ledger.reserved += tokens
        actual = {"tokens": 0}  # what the request has reported using so far

        def record(used_tokens: int) -> None:
            actual["tokens"] = max(0, min(tokens, used_tokens))

        try:
            yield record
        finally:
            ledger.active -= 1
            ledger.reserved -= tokens
            ledger.spend(self._clock(), actual["tokens"])


_SCHEMA_LOCK = 7_414_200_002


def _connection_lost(exc: BaseException) -> bool:
    """PostgreSQL unreachable (no connection, a pool timeout, a broken link: SQLSTATE class 08 or
    none), as opposed to a server that answered with an error."""
    state = getattr(exc, "sqlstate", None)
    return state is None or state.startswith("08")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


class SharedAdmission:
    """The same caps held across every router replica, in PostgreSQL.

    Each admitted request is a row with a lease. Admission runs in one transaction under a
    per-tenant advisory lock: leases past their end are closed first (a killed router's
    reservations come back within ``lease_seconds``, charged what they last reported), then the
    tenant's live rows and its spending in the window are counted against its quotas. Times are
    the database's clock, so replicas' clocks never disagree. A running request's use and lease
    are refreshed by ``heartbeat``; its row is closed with its final use when it ends.
    """

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS admissions (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        reserved BIGINT NOT NULL,
        used BIGINT NOT NULL DEFAULT 0,
        live BOOLEAN NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION
    );
    CREATE INDEX IF NOT EXISTS admissions_by_tenant ON admissions (tenant, live, ended_at)
    """
    _NOW = "extract(epoch from clock_timestamp())"

    def __init__(self, url: str, lease_seconds: float = 30.0, pool=None) -> None:
        """``pool``: a psycopg_pool.ConnectionPool to share (the review store's); else its own."""
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.url = url
        self.lease_seconds = lease_seconds
        self._unreachable = (psycopg.OperationalError, PoolTimeout)
        self._own_pool = pool is None
        self._pool = pool or ConnectionPool(url, min_size=1, max_size=4, timeout=5, kwargs={"connect_timeout": 5}, open=True)
        self._live: dict[str, dict] = {}  # this router's admitted requests: id -> {"used": n}
        # While PostgreSQL cannot be reached each router admits on its own ledger: requests keep
        # being served, and a tenant can then get up to (routers) x its caps until it returns.
        self.fallback = Admission()
        self._warned = 0.0
        self._orphans: set[asyncio.Future] = set()
        with self._pool.connection() as connection, connection.transaction():
            # Under a lock: routers starting together on a fresh database create the table once.
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in filter(str.strip, self.SCHEMA.split(";")):
                connection.execute(statement)

    def _connect(self):
        return self._pool.connection()

    def close(self) -> None:
        if self._own_pool:
            self._pool.close()

    def _reserve(self, tenant: str, quotas: Quotas, tokens: int) -> str:
        admission_id = uuid.uuid4().hex
        with self._connect() as connection, connection.transaction(), connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (tenant,))
            cur.execute(
                f"UPDATE admissions SET live = false, ended_at = lease_until "
                f"WHERE tenant = %s AND live AND lease_until < {self._NOW}",
                (tenant,),
            )
            cur.execute("SELECT count(*), coalesce(sum(reserved), 0) FROM admissions WHERE tenant = %s AND live", (tenant,))
            active, reserved = cur.fetchone()
            cur.execute(
                f"SELECT coalesce(sum(used), 0) FROM admissions WHERE tenant = %s AND NOT live "
                f"AND ended_at > {self._NOW} - %s",
                (tenant, quotas.window_seconds),
            )
            (used,) = cur.fetchone()
            if active >= quotas.max_concurrent:
                raise ResourceExhausted(
                    f"tenant {tenant}: {active} Solve calls in flight across routers, the cap is {quotas.max_concurrent}",
                    [QuotaViolation(f"tenant:{tenant}:concurrent_solves", f"cap {quotas.max_concurrent}")],
                )
            if used + reserved + tokens > quotas.tokens_per_window:
                raise ResourceExhausted(
                    f"tenant {tenant}: token quota of {quotas.tokens_per_window} per {quotas.window_seconds:.0f}s "
                    f"would be exceeded ({used} used, {reserved} reserved, {tokens} asked)",
                    [QuotaViolation(f"tenant:{tenant}:tokens_per_window", f"{quotas.tokens_per_window} per {quotas.window_seconds:.0f}s")],
                )
            cur.execute(
                f"INSERT INTO admissions (id, tenant, reserved, used, live, lease_until) "
                f"VALUES (%s, %s, %s, 0, true, {self._NOW} + %s)",
                (admission_id, tenant, tokens, self.lease_seconds),
            )
            # Rows past every window are history: keep the table small.
            cur.execute(
                f"DELETE FROM admissions WHERE tenant = %s AND NOT live AND ended_at < {self._NOW} - %s",
                (tenant, max(quotas.window_seconds, 3600.0)),
            )
        return admission_id

    def _release(self, admission_id: str, used: int) -> None:
        with self._connect() as connection, connection.transaction():
            connection.execute(
                f"UPDATE admissions SET live = false, used = %s, ended_at = {self._NOW} WHERE id = %s AND live",
                (used, admission_id),
            )

    def _release_orphan(self, reserving: asyncio.Future) -> None:
        """A reservation whose caller left before it committed: close its row at once."""
        if reserving.cancelled() or reserving.exception() is not None:
            return
        admission_id = reserving.result()
        task = asyncio.ensure_future(asyncio.to_thread(self._release, admission_id, 0))
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    def heartbeat_once(self) -> None:
        """Report every live request's use and extend its lease."""
        rows = [(state["used"], self.lease_seconds, admission_id) for admission_id, state in list(self._live.items())]
        if not rows:
            return
        with self._connect() as connection, connection.transaction(), connection.cursor() as cur:
            cur.executemany(
                f"UPDATE admissions SET used = %s, lease_until = {self._NOW} + %s WHERE id = %s AND live", rows
            )

    async def heartbeat(self) -> None:
        """Until cancelled: refresh leases three times per lease period."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await asyncio.to_thread(self.heartbeat_once)
            except Exception:
                log.exception("refreshing admission leases failed; retrying")

    def usage(self, tenant: str, window_seconds: float) -> tuple[int, int, int]:
        """(live requests, tokens reserved by them, tokens used in the window) across routers."""
        with self._connect() as connection, connection.transaction(), connection.cursor() as cur:
            cur.execute(f"UPDATE admissions SET live = false, ended_at = lease_until WHERE tenant = %s AND live AND lease_until < {self._NOW}", (tenant,))
            cur.execute("SELECT count(*), coalesce(sum(reserved), 0) FROM admissions WHERE tenant = %s AND live", (tenant,))
            active, reserved = cur.fetchone()
            cur.execute(
                f"SELECT coalesce(sum(used), 0) FROM admissions WHERE tenant = %s AND NOT live AND ended_at > {self._NOW} - %s",
                (tenant, window_seconds),
            )
            (used,) = cur.fetchone()
        return int(active), int(reserved), int(used)

    @asynccontextmanager
    async def admit(self, tenant: str, quotas: Quotas, tokens: int):
        reserving = asyncio.ensure_future(asyncio.to_thread(self._reserve, tenant, quotas, tokens))
        try:
            # Shielded: a caller that gives up mid-reservation must not leave a row nobody owns.
            admission_id = await asyncio.shield(reserving)
        except asyncio.CancelledError:
            reserving.add_done_callback(self._release_orphan)
            raise
        except self._unreachable as exc:
            if not _connection_lost(exc):
                # PostgreSQL answered but could not decide (a lock or statement timeout, a
                # deadlock): fail closed rather than admit on this router's own ledger.
                raise Unavailable(f"tenant {tenant}: quotas could not be checked ({_first_line(exc)})") from None
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("PostgreSQL unreachable (%s): admitting on this router's own ledger", str(exc).splitlines()[0][:200])
            async with self.fallback.admit(tenant, quotas, tokens) as record:
                yield record
            return
        state = {"used": 0}
        self._live[admission_id] = state

        def record(used_tokens: int) -> None:
            state["used"] = max(0, min(tokens, used_tokens))

        try:
            yield record
        finally:
            self._live.pop(admission_id, None)
            # Shielded: a cancelled request still closes its row. If that fails its lease closes it.
            try:
                await asyncio.shield(asyncio.to_thread(self._release, admission_id, state["used"]))
            except Exception as exc:
                log.warning("closing admission %s failed (%s); its lease will end it", admission_id, type(exc).__name__)
