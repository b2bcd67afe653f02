"""``rmesh-verifier``: serve the verifier (exact checkers, evidence contract, learned scores)."""

from __future__ import annotations

import sys

from rmesh.serving import service_cli


def main(argv: list[str] | None = None) -> int:
    return service_cli(
        "rmesh-verifier", "Reasoning Mesh verifier: judge candidate answers.", "RMESH_VERIFIER_ADDR", argv,
        "rmesh.verifier_svc.serve",
    )


if __name__ == "__main__":
    sys.exit(main())
