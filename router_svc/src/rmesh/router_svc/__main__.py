"""``rmesh-router``: serve the router, or check a tenant directory the way it will load it."""

from __future__ import annotations

import argparse
import os
import sys

from rmesh.config import DEFAULT_TENANTS_DIR, EMBEDDED_N_CTX


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmesh-router", description="Reasoning Mesh router: the public Solve and Review API.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve on $RMESH_ROUTER_ADDR until SIGTERM")
    serve.add_argument("--tenants", help=f"tenant policy directory (default: $RMESH_TENANTS_DIR, else {DEFAULT_TENANTS_DIR})")
    policy = sub.add_parser("policy", help="check tenant policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    for name, text in (
        ("lint", "schema, CEL compilation, identifiers, types, route reachability"),
        ("test", "run each file's sample requests and report rule coverage"),
    ):
        command = policy_sub.add_parser(name, help=text)
        command.add_argument("directory", nargs="?", help="a tenant directory or one file (default: as for serve)")
        command.add_argument("--tenants", help="same as DIRECTORY")
        if name == "lint":
            command.add_argument(
                "--verifier",
                metavar="ADDR",
                help="a running verifier: a file with allow_python_tests fails unless its sandbox is SERVING",
            )
            add_engine_arguments(command)
    return parser


def add_engine_arguments(command: argparse.ArgumentParser) -> None:
    """The engine capacity ``policy lint`` checks routes against."""
    command.add_argument(
        "--engine-tokens", type=int, default=EMBEDDED_N_CTX, metavar="N",
        help=f"KV tokens the engine holds for one solver (default {EMBEDDED_N_CTX}: the embedded default RMESH_N_CTX; "
        "for SGLang, its max_total_num_tokens)",
    )
    command.add_argument(
        "--kv-bytes-per-token", type=int, default=18_432, metavar="B",
        help="KV bytes per token of the served model (default 18432: Gemma 3 270M; see rmesh plan)",
    )


def tenants_dir(flag: str | None) -> str:
    return flag or os.environ.get("RMESH_TENANTS_DIR") or DEFAULT_TENANTS_DIR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "policy":
        from rmesh.router_svc.policy import cli as policy_cli

        directory = tenants_dir(args.directory or args.tenants)
        if args.policy_command == "lint":
            probe = policy_cli.verifier_sandbox(args.verifier) if args.verifier else None
            return policy_cli.lint(directory, probe, args.engine_tokens, args.kv_bytes_per_token)
        return policy_cli.test(directory)
    from rmesh import serving
    from rmesh.router_svc.serve import start

    env = dict(os.environ)
    env["RMESH_TENANTS_DIR"] = tenants_dir(args.tenants)
    return serving.main("rmesh-router", start, env)


if __name__ == "__main__":
    sys.exit(main())
