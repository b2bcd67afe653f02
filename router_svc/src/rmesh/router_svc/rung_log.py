"""The learned prior's data, written off the request path in batches.

Every rung a routed request runs adds one (tenant, kind, rung, success, when, tokens, samples) row. Writing each row in its
own transaction costs a connection, a lock and a sync per request; here rows queue in memory
and one task writes whatever has queued in a single transaction, so a busy router writes a few
large batches instead of many single rows. A request waits only when MAX_PENDING rows are
already queued, and then only for the batch holding its own row.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)

MAX_PENDING = 1024


class RungLog:
    def __init__(self, store, max_pending: int = MAX_PENDING) -> None:
        self._store = store  # a ReviewStore
        self.max_pending = max_pending
        self._pending: list[tuple[str, str, str, bool, float, int, int]] = []
        self._written: asyncio.Future | None = None  # resolves when the pending rows are written
        self._writer: asyncio.Task | None = None

    async def add(self, tenant: str, kind: str, rung: str, success: bool, tokens: int = 0, samples: int = 0) -> None:
        self._pending.append((tenant, kind, rung, success, time.time(), tokens, samples))
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        written = self._written
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        if len(self._pending) >= self.max_pending:
            await asyncio.shield(written)

    async def _write(self) -> None:
        while self._pending:
            rows, written = self._pending, self._written
            self._pending, self._written = [], None
            try:
                await asyncio.to_thread(self._store.record_rungs, rows)
            except Exception as exc:
                log.warning("could not record %d rung outcomes: %s", len(rows), exc)
            finally:
                if written is not None and not written.done():
                    written.set_result(None)

    async def drain(self) -> None:
        """Wait until every queued row is written (at shutdown, and in tests before reading)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
