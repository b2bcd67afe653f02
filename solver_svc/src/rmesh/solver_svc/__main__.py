"""``rmesh-solver``: serve the solver on the engine $RMESH_ENGINE names (embedded by default)."""

from __future__ import annotations

import sys

from rmesh.serving import service_cli


def main(argv: list[str] | None = None) -> int:
    return service_cli(
        "rmesh-solver", "Reasoning Mesh solver: search over candidate answers.", "RMESH_SOLVER_ADDR", argv,
        "rmesh.solver_svc.serve",
    )


if __name__ == "__main__":
    sys.exit(main())
