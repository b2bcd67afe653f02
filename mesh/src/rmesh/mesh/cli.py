"""``rmesh``: serve the mesh, send it problems. Heavy imports wait until a command needs them."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
from typing import Any

DEV_KEY = "demo-key"  # the dev-only key of policy/tenants/demo.yaml
EXIT_NOT_RELEASED = 3
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2


def _serve(args: argparse.Namespace) -> int:
    from rmesh import serving
    from rmesh.mesh.serve import SERVICES, start_services

    names = SERVICES if args.service == "all" else (args.service,)
    env = dict(os.environ)
    if args.tenants:
        env["RMESH_TENANTS_DIR"] = args.tenants
    return serving.main("rmesh serve", lambda e: start_services(names, e), env)


def load_request(args: argparse.Namespace) -> dict[str, Any]:
    """Build the request from --file, then --problem and --evidence on top of it."""
    import yaml

    request: dict[str, Any] = {}
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as handle:
                request = yaml.safe_load(handle) or {}
        except OSError as exc:
            raise SystemExit(f"rmesh solve: cannot read {args.file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SystemExit(f"rmesh solve: {args.file} is not valid YAML: {exc}") from None
        if not isinstance(request, dict):
            raise SystemExit(f"rmesh solve: {args.file} must hold a mapping")
        unknown = set(request) - {"problem", "task", "evidence", "high_impact", "await_review"}
        if unknown:
            raise SystemExit(f"rmesh solve: {args.file}: unknown fields {', '.join(sorted(unknown))}")
    if args.problem is not None:
        request["problem"] = args.problem
    evidence = dict(request.get("evidence") or {})
    for item in args.evidence:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"rmesh solve: --evidence wants KEY=VALUE, got {item!r}")
        evidence[key] = value
    for key in args.drop_evidence:
        evidence.pop(key, None)
    request["evidence"] = evidence
    if args.high_impact:
        request["high_impact"] = True
    if args.await_review:
        request["await_review"] = True
    return request


def _to_proto(request: dict[str, Any]):
    from rmesh.client import build_request

    try:
        return build_request(request)
    except ValueError as exc:
        raise SystemExit(f"rmesh solve: {exc}") from None


_EVENT_NAMES = {"StatusEvent": "status", "ConfigEvent": "config", "ProgressEvent": "progress", "Outcome": "outcome"}


def event_to_dict(event) -> dict[str, Any]:
    """One Solve event as plain JSON: the event name plus its fields, token counts as ints."""
    from google.protobuf import json_format

    name = _EVENT_NAMES[type(event).__name__]
    body = json_format.MessageToDict(event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if "usage" in body:
        body["usage"] = {k: int(v) for k, v in body["usage"].items()}
    return {"event": name, **body}


def _describe(event: dict[str, Any]) -> str:
    kind = event["event"]
    if kind == "status":
        return f"status    {event['message']}"
    if kind == "config":
        budget = event["budget"]
        return (
            f"config    tenant={event['tenant']} strategy={event['strategy']} "
            f"max_tokens={budget['max_tokens']} branches={budget['max_branches']} "
            f"required={','.join(event['required_evidence']) or '-'} ({event['reason']})"
        )
    if kind == "progress":
        u = event["usage"]
        stage = event["stage"] + (f" ({event['stop_reason']})" if event.get("stop_reason") else "")
        return (
            f"progress  {stage}: branches {event['branches_done']}/{event['branches_started']}, "
            f"tokens {u['completion_tokens']} generated, {u['cached_tokens']} cached, "
            f"checks {event['checks_passed']}/{event['checks_total']}"
        )
    lines = [f"outcome   {event['kind']} released={event['released']} ({event['reason']})"]
    if event["released"]:
        lines.append(f"  assurance: {event['assurance'].removeprefix('ASSURANCE_').lower()}")
    if event.get("review_id"):
        lines.append(f"  review: {event['review_id']}")
    if event["released"]:
        for cp in event["checkpoints"]:
            lines.append(f"  [{','.join(cp['cites'])}] {cp['text']}" if cp["cites"] else f"  - {cp['text']}")
        lines.append(f"  answer: {event['answer']}")
    fetched = [s for s in event.get("evidence_sources", []) if s["source"] != "caller"]
    if fetched:
        lines.append("  fetched evidence: " + ", ".join(f"{s['key']} from {s['source']} at {s['fetched_at']}" for s in fetched))
    if event["missing_evidence"]:
        lines.append(f"  missing evidence: {', '.join(event['missing_evidence'])}")
    if event.get("next_step"):
        lines.append(f"  next: {event['next_step']}")
    u = event["usage"]
    lines.append(
        f"  usage: prompt {u['prompt_tokens']}, completion {u['completion_tokens']}, cached {u['cached_tokens']}"
    )
    return "\n".join(lines)


def _client(key: str):
    """A client for the router at $RMESH_ROUTER_ADDR; over TLS when $RMESH_CLIENT_CA names the
    CA (PEM) that signed the router's certificate."""
    from rmesh.client import MeshClient
    from rmesh.config import Addresses, ServerSettings

    ca = os.environ.get("RMESH_CLIENT_CA")
    roots = None
    if ca:
        try:
            roots = pathlib.Path(ca).read_bytes()
        except OSError as exc:
            raise SystemExit(f"rmesh: RMESH_CLIENT_CA={ca}: cannot read ({exc.strerror})") from None
    return MeshClient(
        Addresses.load().router, api_key=key, max_message_bytes=ServerSettings.load().max_message_bytes, root_certificates=roots
    )


def _solve_request(args: argparse.Namespace, request) -> int:
    import grpc

    key = args.tenant_key or os.environ.get("RMESH_API_KEY")
    if not key:
        print("rmesh solve: no --tenant-key or RMESH_API_KEY; using the dev-only key of tenant 'demo'", file=sys.stderr)
        key = DEV_KEY
    outcome: dict[str, Any] | None = None
    with _client(key) as mesh:
        try:
            for message in mesh.solve(request, timeout=args.timeout):
                event = event_to_dict(message)
                print(json.dumps(event) if args.json else _describe(event), flush=True)
                if event["event"] == "outcome":
                    outcome = event
        except grpc.RpcError as exc:
            if args.json:
                print(json.dumps({"event": "error", "code": exc.code().name, "message": exc.details()}))
            else:
                print(f"error: {exc.code().name}: {exc.details()}{_tls_hint(exc)}", file=sys.stderr)
            return EXIT_RPC_ERROR
    return 0 if outcome and outcome["released"] else EXIT_NOT_RELEASED


def _tls_hint(exc) -> str:
    """A plaintext client at a TLS port sees only a closed socket: say what to check."""
    import grpc

    if exc.code() == grpc.StatusCode.UNAVAILABLE and not os.environ.get("RMESH_CLIENT_CA") and "Socket closed" in (exc.details() or ""):
        return " (if the router serves TLS, set RMESH_CLIENT_CA to the CA that signed its certificate)"
    return ""


def _solve(args: argparse.Namespace) -> int:
    if not args.file and args.problem is None:
        print("rmesh solve: give --file REQUEST.yaml or --problem TEXT", file=sys.stderr)
        return EXIT_USAGE
    request = _to_proto(load_request(args))
    return _solve_request(args, request)


def _calibrate(args: argparse.Namespace) -> int:
    from rmesh.engine.llama import LlamaEngine
    from rmesh.mesh.calibrate import calibrate

    if args.size < 4 or args.k < 2:
        print("rmesh verifier calibrate: --size must be at least 4 and --k at least 2", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> dict:
        engine = LlamaEngine.load(n_ctx=8192, max_branches=8)
        try:
            return await calibrate(
                engine, size=args.size, k=args.k, seed=args.seed, calibration_path=args.calibration, report_path=args.report
            )
        finally:
            await engine.aclose()

    report = asyncio.run(run())
    judge = report["judge"]
    print(
        f"judge {judge['scorer']}: threshold {judge['threshold']}, AUROC {judge['auroc']}, ECE {judge['ece']}, "
        f"max N {judge['max_n']}; sandbox {report['sandbox_checks_per_second']} checks/s"
    )
    print(f"wrote {args.calibration} and {args.report}")
    return 0


def _review(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from rmesh.api.review.v1 import review_pb2
    from rmesh.api.router.v1 import router_pb2

    key = args.key or os.environ.get("RMESH_API_KEY")
    if not key:
        print("rmesh review: give --key or set RMESH_API_KEY", file=sys.stderr)
        return EXIT_USAGE

    def show(review) -> str:
        if args.json:
            return json.dumps(json_format.MessageToDict(review, preserving_proto_field_name=True))
        state = review_pb2.ReviewState.Name(review.state).removeprefix("REVIEW_STATE_").lower()
        line = f"{review.id}  {state:9s}  {review.reason}  | {review.problem[:60]}"
        if review.reviewer:
            line += f"  [{review.reviewer}: {review.comment or '-'}{'; answer: ' + review.answer if review.answer else ''}]"
        draft = review.draft
        assurance = draft.assurance and router_pb2.Assurance.Name(draft.assurance).removeprefix("ASSURANCE_").lower()
        line += f"\n  draft: {draft.answer[:200] or '(no answer)'} ({assurance or draft.gate_reason})"
        if review.HasField("outcome"):
            line += f"\n  outcome: {router_pb2.OutcomeKind.Name(review.outcome.kind)} {review.outcome.answer[:200]}"
        return line

    with _client(key) as mesh:
        try:
            if args.review_command == "list":
                reviews = mesh.list_reviews(args.state, timeout=30)
                for review in reviews:
                    print(show(review))
                if not reviews:
                    # On stderr: a script reading stdout still gets no lines for no reviews.
                    print(f"no {args.state + ' ' if args.state else ''}reviews for this key's tenant", file=sys.stderr)
            elif args.review_command == "show":
                print(show(mesh.get_review(args.id, timeout=30)))
            else:
                review = mesh.resolve_review(
                    args.id, args.review_command, answer=getattr(args, "answer", "") or "", comment=args.comment, timeout=30
                )
                print(show(review))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}{_tls_hint(exc)}", file=sys.stderr)
            return EXIT_RPC_ERROR
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rmesh.mesh.evaluation import DEFAULT_POLICIES, SPECS, EvalError, run

    datasets = args.datasets.split(",") if args.datasets else list(SPECS)
    policies = args.policies.split(",") if args.policies else list(DEFAULT_POLICIES)
    try:
        payload = asyncio.run(
            run(datasets, args.size, policies, args.router, args.seed, args.out, args.plot, args.timeout)
        )
    except EvalError as exc:
        print(f"rmesh eval: {exc}", file=sys.stderr)
        return EXIT_USAGE if "unknown" in str(exc) or "--size" in str(exc) else EXIT_RPC_ERROR
    print(f"{'policy':12s} {'accuracy':>8s} {'tokens':>8s} {'cached':>8s} {'p50 s':>6s} {'p95 s':>6s} {'escalated':>9s}")
    for policy, data in payload["policies"].items():
        o = data["overall"]
        print(
            f"{policy:12s} {o['accuracy']:8.3f} {o['generated_tokens_mean']:8.1f} {o['cached_tokens_mean']:8.1f} "
            f"{o['wall_seconds_p50']:6.2f} {o['wall_seconds_p95']:6.2f} {o['escalated_share']:9.2f}"
        )
    print(json.dumps(payload["goals"]))
    print(f"wrote {args.out} and {args.plot}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """``rmesh plan``: the seed's capacity table for one model."""
    from rmesh.capacity import capacity_rows, human_bytes
    from rmesh.errors import ConfigError

    for flag, value, low in (("--branches", args.branches, 1), ("--context", args.context, 1), ("--prefix", args.prefix, 0)):
        if not low <= value <= 1 << 24:
            print(f"rmesh plan: {flag} must be from {low} to {1 << 24}, got {value}", file=sys.stderr)
            return EXIT_USAGE
    if args.prefix > args.context:
        print(f"rmesh plan: --prefix {args.prefix} is longer than --context {args.context}", file=sys.stderr)
        return EXIT_USAGE
    try:
        model, per_token, layout = _plan_geometry(args)
    except (ConfigError, ValueError) as exc:
        print(f"rmesh plan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    counts = sorted({*(1 << i for i in range(20) if 1 << i < args.branches), args.branches})
    rows = capacity_rows(per_token, counts, args.context, args.prefix)
    if args.json:
        print(json.dumps({
            "model": model, "layout": layout, "kv_bytes_per_token": per_token, "context": args.context,
            "prefix": args.prefix, "rows": [row.__dict__ for row in rows],
        }))
        return 0
    print(f"{model}: {layout} = {per_token} bytes ({human_bytes(per_token)}) of KV per token")
    print(f"{args.context} tokens per branch, the first {args.prefix} shared\n")
    print(f"{'branches':>8}  {'per branch':>12}  {'worst case':>12}  {'shared prefix':>13}  {'saved':>6}")
    for row in rows:
        saved = 1 - row.shared_prefix / row.worst_case if row.worst_case else 0.0
        print(
            f"{row.branches:>8}  {human_bytes(row.per_branch):>12}  {human_bytes(row.worst_case):>12}  "
            f"{human_bytes(row.shared_prefix):>13}  {saved:>6.0%}"
        )
    return 0


def _plan_geometry(args: argparse.Namespace) -> tuple[str, int, str]:
    """(model, KV bytes per token, how that figure is made up) from the flag given."""
    if args.geometry:
        parts = args.geometry.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() and 0 < int(p) < 1 << 20 for p in parts):
            raise ValueError(f"--geometry {args.geometry!r} is not four positive integers: layers,kv_heads,head_dim,bytes")
        layers, heads, dim, width = (int(p) for p in parts)
        return "the given geometry", 2 * layers * heads * dim * width, f"2 x {layers} layers x {heads} KV heads x {dim} dims x {width} bytes"
    if args.sglang:
        from rmesh.engine.sglang import SGLangEngine

        async def ask() -> tuple[str, int]:
            engine = SGLangEngine(args.sglang)
            try:
                if not await engine.describe():
                    raise ValueError(f"SGLang at {args.sglang} did not answer /server_info")
                if not engine.reported_kv_bytes_per_token:
                    raise ValueError(f"SGLang at {args.sglang} does not report its KV pool (internal_states memory_usage)")
                return engine.model_name, engine.reported_kv_bytes_per_token
            finally:
                await engine.aclose()

        model, per_token = asyncio.run(ask())
        return model, per_token, "SGLang's KV pool over its token capacity"
    from rmesh.engine.llama import gguf_kv_geometry

    name, geometry = gguf_kv_geometry(args.gguf)
    return name, geometry.bytes_per_token, (
        f"2 x {geometry.layers} layers x {geometry.kv_heads} KV heads x {geometry.head_dim} dims x "
        f"{geometry.bytes_per_element} bytes"
    )


def _policy(args: argparse.Namespace) -> int:
    """As ``rmesh-router policy``; lint checks python_tests against this machine's sandbox, where
    ``rmesh serve`` runs the verifier."""
    from rmesh.router_svc.__main__ import tenants_dir
    from rmesh.router_svc.policy import cli as policy_cli

    directory = tenants_dir(args.directory)
    if args.policy_command == "lint":
        from rmesh.verifier_svc.sandbox import probe

        return policy_cli.lint(directory, probe, args.engine_tokens, args.kv_bytes_per_token)
    return policy_cli.test(directory)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmesh", description="Reasoning Mesh: adaptive test-time compute over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the mesh's services in the foreground")
    serve.add_argument("service", nargs="?", default="all", choices=["all", "router", "solver", "verifier"])
    serve.add_argument("--tenants", help="tenant policy directory (default: $RMESH_TENANTS_DIR, else policy/tenants)")
    serve.set_defaults(func=_serve)

    solve = sub.add_parser("solve", help="send one problem to the router and stream its events")
    solve.add_argument("--file", help="request file (YAML): problem, task, evidence, high_impact, await_review")
    solve.add_argument("--problem", help="problem text (overrides the file's)")
    solve.add_argument("--evidence", action="append", default=[], metavar="KEY=VALUE", help="add or override evidence")
    solve.add_argument("--drop-evidence", action="append", default=[], metavar="KEY", help="remove an evidence key")
    solve.add_argument("--tenant-key", help="API key (default: $RMESH_API_KEY)")
    solve.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default 300)")
    solve.add_argument("--json", action="store_true", help="print one JSON object per event")
    solve.add_argument("--high-impact", action="store_true", help="mark the request high-impact (never released unverified)")
    solve.add_argument(
        "--await-review", action="store_true", help="if escalated, wait (within --timeout) for the reviewer's decision"
    )
    solve.set_defaults(func=_solve)

    policy = sub.add_parser("policy", help="check tenant policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    for name, text in (("lint", "schema, CEL compilation, identifiers, types, route reachability"), ("test", "run each file's sample requests and report rule coverage")):
        command = policy_sub.add_parser(name, help=text)
        command.add_argument("directory", nargs="?", help="a tenant directory or one file (default: $RMESH_TENANTS_DIR, else policy/tenants)")
        if name == "lint":
            from rmesh.router_svc.__main__ import add_engine_arguments

            add_engine_arguments(command)
        command.set_defaults(func=_policy)

    capacity = sub.add_parser("plan", help="KV capacity for a model's geometry: per branch, worst case, with a shared prefix")
    source = capacity.add_mutually_exclusive_group()
    source.add_argument("--gguf", metavar="PATH", help="read the geometry from a GGUF file (default: the packaged Gemma 3 270M)")
    source.add_argument("--sglang", metavar="URL", help="ask a running SGLang server (/server_info) for its KV bytes per token")
    source.add_argument("--geometry", metavar="L,H,D,B", help="layers, KV heads, head dim, bytes per element")
    capacity.add_argument("--branches", type=int, default=8, help="live branches (rows double up to it; default 8)")
    capacity.add_argument("--context", type=int, default=4096, help="tokens per branch, prefix included (default 4096)")
    capacity.add_argument("--prefix", type=int, default=350, help="tokens the branches share (default 350: a shipped prompt)")
    capacity.add_argument("--json", action="store_true", help="print JSON")
    capacity.set_defaults(func=_plan)

    evaluate = sub.add_parser("eval", help="compare fixed and adaptive policies on reasoning-gym tasks through the mesh")
    evaluate.add_argument("--datasets", help="comma-separated (default: all): basic_arithmetic/1-digit, basic_arithmetic/2-digit, basic_arithmetic/3-digit, chain_sum/1-digit, countdown/3-numbers, countdown/5-numbers")
    evaluate.add_argument("--size", type=int, default=24, help="tasks per dataset")
    evaluate.add_argument("--policies", help="comma-separated (default: single_pass,best_of_8,adaptive; also beam); adaptive is the shipped demo tenant's arithmetic route")
    evaluate.add_argument("--router", help="an already running mesh with the policy/eval tenants and the shipped demo tenant (default: start one)")
    evaluate.add_argument("--seed", type=int, default=7)
    evaluate.add_argument("--timeout", type=float, default=300.0, help="per-request deadline in seconds")
    evaluate.add_argument("--out", default="bench/out/eval.json")
    evaluate.add_argument("--plot", default="bench/out/eval.png")
    evaluate.set_defaults(func=_eval)

    review = sub.add_parser("review", help="list and resolve escalated requests")
    review.add_argument("--key", help="API key (default: $RMESH_API_KEY); resolving needs a reviewer key")
    review.add_argument("--json", action="store_true", help="one JSON object per review")
    review_sub = review.add_subparsers(dest="review_command", required=True)
    listing = review_sub.add_parser("list", help="the tenant's reviews, newest first")
    listing.add_argument("--state", choices=["pending", "approved", "edited", "rejected", "expired"])
    review_sub.add_parser("show", help="one review").add_argument("id")
    for name in ("approve", "edit", "reject"):
        command = review_sub.add_parser(name, help=f"{name} a pending review")
        command.add_argument("id")
        command.add_argument("--comment", default="")
        if name == "edit":
            command.add_argument("--answer", required=True, help="the replacement answer")
    for command in (listing, *[review_sub.choices[n] for n in ("show", "approve", "edit", "reject")]):
        command.set_defaults(func=_review)

    verifier = sub.add_parser("verifier", help="verifier tools")
    verifier_sub = verifier.add_subparsers(dest="verifier_command", required=True)
    cal = verifier_sub.add_parser("calibrate", help="fit the learned judge's release threshold on labelled candidates")
    cal.add_argument("--size", type=int, default=48, help="reasoning-gym tasks (half fit, half held out)")
    cal.add_argument("--k", type=int, default=4, help="candidates per task")
    cal.add_argument("--seed", type=int, default=2026)
    cal.add_argument("--calibration", default="verifier_svc/src/rmesh/verifier_svc/calibration/judge.json", help="calibration file to write (default: the one the verifier package ships)")
    cal.add_argument("--report", default="bench/out/verifier.json")
    cal.set_defaults(func=_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
