"""Per-tenant admission: a cap on concurrent Solve calls and a token quota per time window.

A request reserves its whole token budget when admitted and is reconciled with what it really
used when it ends, so concurrent requests can never overspend the window between them. The
request reports its use as it goes: whether it ends in an answer, an error, a cancel or a
deadline, it is charged what it used by then, never its whole reservation; branches that were
still decoding when it ended count at their token cap (the engine may have spent it).
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

from rmesh.errors import QuotaViolation, ResourceExhausted
from rmesh.router_svc.policy.model import Quotas


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

    @contextmanager
    def admit(self, tenant: str, quotas: Quotas, tokens: int):
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
