"""The solver process's KV budget across concurrent requests.

A request reserves its estimated peak KV bytes before its first round and returns them when
it ends. One that does not fit waits a bounded time, then fails with RESOURCE_EXHAUSTED and a
quota detail: the process never runs itself out of KV memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from rmesh import metrics
from rmesh.errors import QuotaViolation, ResourceExhausted

SUBJECT = "solver:kv_bytes"


class KVLedger:
    def __init__(self, capacity_bytes: int, wait_seconds: float) -> None:
        self.capacity = capacity_bytes
        self.wait_seconds = wait_seconds
        self.in_use = 0
        # KV the engine holds for others (other solvers on one SGLang server), as it last said.
        self.external = 0
        self._changed = asyncio.Condition()
        metrics.KV_CAPACITY.set(capacity_bytes)

    async def set_capacity(self, capacity_bytes: int) -> None:
        """The engine reported its real capacity (SGLang's KV pool): admit against that."""
        async with self._changed:
            self.capacity = capacity_bytes
            metrics.KV_CAPACITY.set(capacity_bytes)
            self._changed.notify_all()

    async def set_external(self, nbytes: int) -> None:
        """The engine's own count of KV in use, less this solver's reservations: admit against
        what is really free on a server other solvers share."""
        async with self._changed:
            self.external = max(0, nbytes)
            self._changed.notify_all()

    @asynccontextmanager
    async def reserve(self, nbytes: int, max_wait: float | None = None) -> AsyncIterator[None]:
        if nbytes > self.capacity:
            raise ResourceExhausted(
                f"request needs {nbytes} KV bytes; the solver's whole budget is {self.capacity}",
                [QuotaViolation(SUBJECT, f"needs {nbytes} of {self.capacity} bytes")],
            )
        wait = self.wait_seconds if max_wait is None else max(0.0, min(self.wait_seconds, max_wait))
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.in_use + self.external + nbytes <= self.capacity), wait
                )
            except TimeoutError:
                raise ResourceExhausted(
                    f"KV budget busy: {nbytes} bytes needed, {self.capacity - self.in_use - self.external} of "
                    f"{self.capacity} free after waiting {wait:.1f}s"
                    + (f" ({self.external} held by the engine's other clients)" if self.external else ""),
                    [QuotaViolation(SUBJECT, f"needs {nbytes}, {self.capacity - self.in_use - self.external} free")],
                ) from None
            self.in_use += nbytes
            metrics.KV_IN_USE.set(self.in_use)
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= nbytes
                metrics.KV_IN_USE.set(self.in_use)
                self._changed.notify_all()
