"""How hard the fuzz tests push: a fixed number of examples in `make test`, many more in
`make fuzz` (RMESH_FUZZ_FACTOR multiplies every fuzz test's example count)."""

from __future__ import annotations

import os

FACTOR = max(1, int(os.environ.get("RMESH_FUZZ_FACTOR", "1")))


def examples(n: int) -> int:
    return n * FACTOR
